"""Queue memory around the C data path: mempools and RX/TX descriptor rings in DMA memory.

Family-independent: the 82599 and the 82576 share the advanced descriptor formats
(docs/reference/82576.md#descriptors), so a driver only says where a queue's tail register
is and how big things are. Every cffi object the C code points into (structs, free stacks,
slot arrays) is owned by a Python object here, so nothing is collected while native code
uses it.
Native workers get the struct pointers (`RxQueue.pointer`, `TxQueue.pointer`,
`Mempool.pointer`); the Python `rx_batch`/`tx_batch` wrappers are for tests and slow paths.

Buffer lifetime across ports: a TX ring may hold buffers of another port's pool (a
forwarder sends what it received). A pool's DMA memory is therefore freed only once no
open TX queue still holds one of its buffers; `Mempool.close` defers the free until then
and `TxQueue.close` completes it. Stop every worker that uses a queue before closing it.
"""

from __future__ import annotations

import threading
import weakref

from .._datapath import ffi, lib
from ..device import PciFunction
from ..dma import DESCRIPTOR_ALIGNMENT, DmaBuffer, DmaMemory
from ..errors import DmaError

PKT_HEADROOM = lib.IXYD_PKT_HEADROOM  # ixyd_pkt header; the device sees data[] only
PKT_DATA_SIZE = 2048  # the device's receive buffer: SRRCTL.BSIZEPACKET = 2 KB
ENTRY_SIZE = PKT_HEADROOM + PKT_DATA_SIZE  # 2176 bytes, a multiple of 128
DESCRIPTOR_SIZE = 16  # advanced RX and TX descriptors (docs/reference/82599.md#rx-descriptors)
# Rings start as all-ones, as in ixy and Snabb: a device that DMAs a descriptor the driver
# never wrote sees an obviously bad address instead of a plausible zero.
UNWRITTEN_RING_BYTE = 0xFF

_lock = threading.Lock()
_closed_pools: list[Mempool] = []  # closed, memory not yet freed
_open_tx_queues: weakref.WeakSet[TxQueue] = weakref.WeakSet()


class Mempool:
    """`count` packet buffers of `entry_size` bytes in one DMA allocation.

    The free list (a stack of indices) lives in host memory. Buffers are handed out and
    returned by the C data path; `alloc` is the Python door for tests and generators.
    """

    def __init__(self, dma: DmaMemory, count: int, entry_size: int = ENTRY_SIZE):
        if count < 1:
            raise ValueError(f"a mempool needs at least one buffer, got {count}")
        self.count = count
        self.entry_size = entry_size
        self._dma = dma
        self._memory: DmaBuffer | None = dma.alloc(count * entry_size, DESCRIPTOR_ALIGNMENT)
        self._stack = ffi.new("uint32_t[]", count)
        self.pointer = ffi.new("struct ixyd_mempool *")
        base = ffi.cast("void *", self._memory.vaddr)
        if lib.ixyd_mempool_init(
            self.pointer, base, self._memory.iova, entry_size, count, self._stack
        ):
            dma.free(self._memory)
            raise DmaError(f"cannot lay out a mempool of {count} x {entry_size} bytes (alignment?)")
        self.base = self._memory.vaddr
        self.end = self.base + count * entry_size
        self.closed = False

    @property
    def free_count(self) -> int:
        """Buffers currently on the free stack."""
        return self.pointer.free_top

    def alloc(self, n: int) -> list:
        """Take n buffers (cffi `struct ixyd_pkt *`), or none if fewer are free."""
        out = ffi.new("struct ixyd_pkt *[]", n)
        return list(out[0:n]) if lib.ixyd_pkt_alloc_bulk(self.pointer, out, n) == n else []

    @property
    def released(self) -> bool:
        """Whether the pool's DMA memory has been freed."""
        return self._memory is None

    def owns(self, address: int) -> bool:
        """Whether a buffer address lies inside this pool."""
        return self.base <= address < self.end

    def close(self) -> None:
        """Release the pool; its memory is freed once no open TX queue holds its buffers."""
        with _lock:
            if self.closed:
                return
            self.closed = True
            _closed_pools.append(self)
        _free_unreferenced_pools()

    def _free_memory(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            self._dma.free(memory)


class RxQueue:
    """One receive ring, its mempool and the C queue state.

    Construction allocates the ring (all-ones) and the pool; `fill` gives every
    descriptor a buffer (ixyd_rxq_init) but writes no register: the driver programs
    RDBAL/RDLEN from `ring_iova`/`ring_bytes` and writes RDH and RDT itself.
    """

    def __init__(
        self,
        dev: PciFunction,
        index: int,
        rdt_offset: int,
        size: int,
        pool_size: int,
        error_mask: int = lib.IXYD_RXE_82599,
    ):
        self.index = index
        self.error_mask = error_mask  # the family's RX MAC-error bit: such frames are dropped
        self.size = size
        self.pool = Mempool(dev.dma, pool_size)
        self._dma = dev.dma
        try:
            self._ring: DmaBuffer | None = _alloc_ring(dev.dma, size)
        except BaseException:
            self.pool.close()
            raise
        self.ring_iova = self._ring.iova
        self.ring_bytes = size * DESCRIPTOR_SIZE
        self._slots = ffi.new("struct ixyd_pkt *[]", size)
        self._rdt = ffi.cast("uint32_t *", dev.regs_address + rdt_offset)
        self.pointer = ffi.new("struct ixyd_rxq *")
        self.filled = False

    def fill(self) -> None:
        """Arm every descriptor with a fresh buffer from the pool (datasheet 4.6.7)."""
        ring = ffi.cast("void *", self._ring.vaddr)
        if lib.ixyd_rxq_init(
            self.pointer, ring, self._rdt, self._slots, self.pool.pointer, self.size
        ):
            raise DmaError(
                f"RX queue {self.index}: a pool of {self.pool.free_count} free buffers cannot fill "
                f"a ring of {self.size} descriptors"
            )
        self.pointer.error_mask = self.error_mask
        self.filled = True

    def rx_batch(self, max_packets: int = 32) -> list:
        """Receive up to max_packets frames as cffi `struct ixyd_pkt *`; free or send each one."""
        out = ffi.new("struct ixyd_pkt *[]", max_packets)
        n = lib.ixyd_rx_batch(self.pointer, out, max_packets)
        return list(out[0:n])

    @property
    def stats(self) -> dict[str, int]:
        """The C queue's own counters: packets, bytes and the drops it made."""
        s = self.pointer.stats
        return {
            name: getattr(s, name)
            for name in (
                "packets",
                "bytes",
                "drop_no_buffer",
                "drop_multi_descriptor",
                "drop_errors",
            )
        }

    def close(self) -> None:
        """Return the ring's buffers to the pool and free ring and pool (device stopped first!)."""
        if self._ring is None:
            return
        if self.filled:
            lib.ixyd_rxq_free_all(self.pointer)
            self.filled = False
        ring, self._ring = self._ring, None
        self._dma.free(ring)
        self.pool.close()


class TxQueue:
    """One transmit ring and the C queue state. Buffers come from any pool."""

    def __init__(self, dev: PciFunction, index: int, tdt_offset: int, size: int):
        self.index = index
        self.size = size
        self._dma = dev.dma
        self._ring: DmaBuffer | None = _alloc_ring(dev.dma, size)
        self.ring_iova = self._ring.iova
        self.ring_bytes = size * DESCRIPTOR_SIZE
        self._slots = ffi.new("struct ixyd_pkt *[]", size)
        self._tdt = ffi.cast("uint32_t *", dev.regs_address + tdt_offset)
        self.pointer = ffi.new("struct ixyd_txq *")
        if lib.ixyd_txq_init(
            self.pointer, ffi.cast("void *", self._ring.vaddr), self._tdt, self._slots, size
        ):
            dev.dma.free(self._ring)
            raise DmaError(f"TX queue {index}: bad ring size {size}")
        with _lock:
            _open_tx_queues.add(self)

    def tx_batch(self, packets: list) -> int:
        """Queue packets for sending; returns how many were taken (the rest stay the caller's)."""
        if not packets:
            return 0
        return lib.ixyd_tx_batch(
            self.pointer, ffi.new("struct ixyd_pkt *[]", packets), len(packets)
        )

    def reclaim(self) -> int:
        """Give sent buffers back to their pools; returns how many."""
        return lib.ixyd_txq_reclaim(self.pointer)

    @property
    def in_flight(self) -> int:
        """Descriptors queued and not yet reclaimed."""
        return (self.pointer.tail - self.pointer.clean) % self.size

    @property
    def stats(self) -> dict[str, int]:
        """The C queue's own counters: packets and bytes queued."""
        s = self.pointer.stats
        return {"packets": s.packets, "bytes": s.bytes}

    def _held_buffers(self) -> list[int]:
        q = self.pointer
        return [
            int(ffi.cast("uintptr_t", self._slots[i % self.size]))
            for i in range(q.clean, q.clean + self.in_flight)
        ]

    def close(self) -> None:
        """Return queued buffers to their pools and free the ring (device stopped first!)."""
        if self._ring is None:
            return
        lib.ixyd_txq_free_all(self.pointer)
        ring, self._ring = self._ring, None
        self._dma.free(ring)
        with _lock:
            _open_tx_queues.discard(self)
        _free_unreferenced_pools()


def _alloc_ring(dma: DmaMemory, size: int) -> DmaBuffer:
    ring = dma.alloc(size * DESCRIPTOR_SIZE, DESCRIPTOR_ALIGNMENT)
    ffi.memmove(ffi.cast("void *", ring.vaddr), bytes([UNWRITTEN_RING_BYTE]) * ring.size, ring.size)
    return ring


def _free_unreferenced_pools() -> None:
    """Free the memory of closed pools that no open TX queue holds a buffer of."""
    with _lock:
        held = [address for q in _open_tx_queues for address in q._held_buffers()]
        done = [p for p in _closed_pools if not any(p.owns(a) for a in held)]
        for pool in done:
            _closed_pools.remove(pool)
    for pool in done:
        pool._free_memory()


def packet_data(packet) -> bytes:
    """A copy of a packet's frame bytes."""
    return bytes(ffi.buffer(packet.data, packet.len))


def write_packet(packet, frame: bytes) -> None:
    """Put a frame into a packet buffer and set its length (at most 2048 bytes)."""
    if len(frame) > PKT_DATA_SIZE:
        raise ValueError(
            f"a frame of {len(frame)} bytes does not fit a {PKT_DATA_SIZE}-byte buffer"
        )
    ffi.memmove(packet.data, frame, len(frame))
    packet.len = len(frame)


def free_packets(packets: list) -> None:
    """Return packets to their pools."""
    if packets:
        lib.ixyd_pkt_free_bulk(ffi.new("struct ixyd_pkt *[]", packets), len(packets))
