"""Ring logic of the native datapath, with the device side emulated here in Python.

The emulated device works on the descriptor bytes exactly as the datasheet lays them out
(docs/reference/82599.md#rx-descriptors .. #ring-mechanics), independently of the C
definitions: it receives into the descriptors from RDH up to (not including) RDT, writes
payload, then length and status; it sends the descriptors from TDH up to TDT and writes DD
back only where RS is set (WTHRESH = 0). Memory comes from ffi.new; the real device model is
exercised by the integration tests.
"""

from __future__ import annotations

import struct
import threading

import pytest
from ixyd._datapath import ffi, lib

# descriptor bits, docs/reference/82599.md#rx-descriptors and #tx-descriptors
RX_DD, RX_EOP, RX_RXE = 0x1, 0x2, 0x20000000
TX_DTYP_DATA = 0x00300000
TX_EOP = 0x01000000
TX_IFCS = 0x02000000
TX_RS = 0x08000000
TX_DEXT = 0x20000000
TX_DD = 0x1
DESC = 16
HEADROOM = 128


def aligned(nbytes: int, alignment: int = 128):
    """ffi memory of nbytes starting at an aligned address; returns (owner, pointer)."""
    owner = ffi.new("uint8_t[]", nbytes + alignment)
    address = int(ffi.cast("uintptr_t", owner))
    return owner, ffi.cast("uint8_t *", (address + alignment - 1) // alignment * alignment)


class Pool:
    """A mempool in ffi memory with a fake, distinct IOVA range."""

    def __init__(self, count: int, entry_size: int = 2048, iova: int = 0x10_0000_0000):
        self.count, self.entry_size, self.iova = count, entry_size, iova
        self._owner, self.base = aligned(count * entry_size)
        self.stack = ffi.new("uint32_t[]", count)
        self.mp = ffi.new("struct ixyd_mempool *")
        assert lib.ixyd_mempool_init(self.mp, self.base, iova, entry_size, count, self.stack) == 0

    @property
    def free(self) -> int:
        return self.mp.free_top

    def owns(self, iova: int) -> bool:
        return self.iova <= iova < self.iova + self.count * self.entry_size

    def pkt_at_iova(self, iova: int):
        offset = iova - HEADROOM - self.iova
        assert offset % self.entry_size == 0, f"IOVA {iova:#x} is not the data of an entry"
        return ffi.cast("struct ixyd_pkt *", self.base + offset)

    def free_indices(self) -> list[int]:
        return [self.stack[k] for k in range(self.free)]


def alloc(pool: Pool, n: int):
    out = ffi.new("struct ixyd_pkt *[]", max(n, 1))
    assert lib.ixyd_pkt_alloc_bulk(pool.mp, out, n) == n
    return [out[k] for k in range(n)]


def frame(seq: int, length: int = 64) -> bytes:
    """A test frame whose bytes say which frame it is."""
    return (
        bytes([0xAA, 0x00])
        + seq.to_bytes(4, "little")
        + bytes((seq + k) & 0xFF for k in range(length - 6))
    )


class Rx:
    """An RX queue and the device end of its ring."""

    def __init__(self, pool: Pool, size: int = 64):
        self.pool, self.size = pool, size
        self._ring_owner, self.ring_ptr = aligned(size * DESC)
        self.ring = ffi.buffer(self.ring_ptr, size * DESC)
        self.rdt = ffi.new("uint32_t *")
        self.slots = ffi.new("struct ixyd_pkt *[]", size)
        self.q = ffi.new("struct ixyd_rxq *")
        assert lib.ixyd_rxq_init(self.q, self.ring_ptr, self.rdt, self.slots, pool.mp, size) == 0
        # what the driver does after enabling the queue (docs/reference/82599.md#ring-mechanics)
        self.rdh, self.rdt[0] = 0, size - 1
        self.out = ffi.new("struct ixyd_pkt *[]", 256)

    def desc_read(self, k: int) -> tuple[int, int]:
        return struct.unpack_from("<QQ", self.ring, k * DESC)

    def device_receive(
        self, payload: bytes, status: int = RX_DD | RX_EOP, rss: int = 0, lo: int = 0
    ) -> bool:
        """Device side: DMA one frame into the descriptor at RDH. False when RDH == RDT."""
        if self.rdh == self.rdt[0]:
            return False
        pkt_addr, hdr_addr = self.desc_read(self.rdh)
        assert hdr_addr & 1 == 0, "hdr_addr bit 0 aliases DD and must be clear"
        pkt = self.pool.pkt_at_iova(pkt_addr)
        assert len(payload) <= self.pool.entry_size - HEADROOM, "frame larger than the buffer"
        ffi.memmove(pkt.data, payload, len(payload))
        struct.pack_into("<IIIHH", self.ring, self.rdh * DESC, lo, rss, status, len(payload), 0)
        self.rdh = (self.rdh + 1) % self.size
        return True

    def batch(self, max_: int = 32) -> list:
        n = lib.ixyd_rx_batch(self.q, self.out, max_)
        return [self.out[k] for k in range(n)]

    @property
    def stats(self):
        return self.q.stats


class Tx:
    """A TX queue and the device end of its ring."""

    def __init__(self, pools: list[Pool], size: int = 64):
        self.pools, self.size = pools, size
        self._ring_owner, self.ring_ptr = aligned(size * DESC)
        self.ring = ffi.buffer(self.ring_ptr, size * DESC)
        self.tdt = ffi.new("uint32_t *")
        self.slots = ffi.new("struct ixyd_pkt *[]", size)
        self.q = ffi.new("struct ixyd_txq *")
        assert lib.ixyd_txq_init(self.q, self.ring_ptr, self.tdt, self.slots, size) == 0
        self.tdh = 0
        self.wire: list[bytes] = []
        self.descriptors: list[tuple[int, int, int, int]] = []  # (index, addr, cmd, olinfo)

    def send(self, pkts: list) -> int:
        arr = ffi.new("struct ixyd_pkt *[]", pkts) if pkts else ffi.NULL
        return lib.ixyd_tx_batch(self.q, arr, len(pkts))

    def device_transmit(self, limit: int | None = None) -> int:
        """Device side: send from TDH up to TDT, writing DD back where RS is set."""
        sent = 0
        while self.tdh != self.tdt[0] and (limit is None or sent < limit):
            addr, cmd, olinfo = struct.unpack_from("<QII", self.ring, self.tdh * DESC)
            length = cmd & 0xFFFF
            pool = next(p for p in self.pools if p.owns(addr))
            self.wire.append(bytes(ffi.buffer(pool.pkt_at_iova(addr).data, length)))
            self.descriptors.append((self.tdh, addr, cmd, olinfo))
            if cmd & TX_RS:
                struct.pack_into("<QII", self.ring, self.tdh * DESC, 0, 0, TX_DD)
            self.tdh = (self.tdh + 1) % self.size
            sent += 1
        return sent


def in_flight(tx: Tx) -> int:
    return (tx.q.tail - tx.q.clean) % tx.size


# ------------------------------------------------------------------ mempool


def test_mempool_init_writes_every_header_and_stacks_every_index():
    pool = Pool(16, entry_size=512, iova=0x4000_0000)
    assert pool.free == 16
    assert sorted(pool.free_indices()) == list(range(16))
    for i in range(16):
        pkt = ffi.cast("struct ixyd_pkt *", pool.base + i * 512)
        assert pkt.data_iova == 0x4000_0000 + i * 512 + HEADROOM
        assert pkt.pool == pool.mp and pkt.index == i and pkt.len == 0
        assert int(ffi.cast("uintptr_t", pkt.data)) % 128 == 0
    assert ffi.offsetof("struct ixyd_pkt", "data") == HEADROOM == lib.IXYD_PKT_HEADROOM


@pytest.mark.parametrize(
    "entry_size, count, misalign, iova",
    [
        (2000, 8, 0, 0x10000),
        (128, 8, 0, 0x10000),
        (2048, 0, 0, 0x10000),
        (2048, 8, 64, 0x10000),
        (2048, 8, 0, 0x10040),
    ],
    ids=[
        "size-not-multiple-of-128",
        "size-below-256",
        "count-zero",
        "base-unaligned",
        "iova-unaligned",
    ],
)
def test_mempool_init_rejects_bad_arguments(entry_size, count, misalign, iova):
    _owner, base = aligned(2048 * 9)
    stack = ffi.new("uint32_t[]", 9)
    mp = ffi.new("struct ixyd_mempool *")
    assert lib.ixyd_mempool_init(mp, base + misalign, iova, entry_size, count, stack) == -1


def test_alloc_bulk_is_all_or_nothing():
    pool = Pool(10)
    out = ffi.new("struct ixyd_pkt *[]", 16)
    assert lib.ixyd_pkt_alloc_bulk(pool.mp, out, 11) == 0
    assert pool.free == 10
    assert lib.ixyd_pkt_alloc_bulk(pool.mp, out, 7) == 7
    assert [out[k].index for k in range(7)] == list(range(7))
    assert lib.ixyd_pkt_alloc_bulk(pool.mp, out, 4) == 0
    assert pool.free == 3
    assert lib.ixyd_pkt_alloc_bulk(pool.mp, out, 3) == 3
    assert pool.free == 0


def test_free_bulk_returns_each_buffer_to_its_own_pool():
    a, b = Pool(8, iova=0x10_0000), Pool(8, iova=0x90_0000)
    mixed = alloc(a, 3) + alloc(b, 2) + alloc(a, 1) + alloc(b, 4)
    assert (a.free, b.free) == (4, 2)
    lib.ixyd_pkt_free_bulk(ffi.new("struct ixyd_pkt *[]", mixed[:7]), 7)
    assert (a.free, b.free) == (8, 5)
    for p in mixed[7:]:
        lib.ixyd_pkt_free(p)
    assert (a.free, b.free) == (8, 8)
    assert sorted(a.free_indices()) == list(range(8)) and sorted(b.free_indices()) == list(range(8))


# ------------------------------------------------------------------ RX


def test_rxq_init_arms_every_descriptor_with_its_own_buffer():
    pool = Pool(100)
    rx = Rx(pool, size=64)
    assert pool.free == 100 - 64
    addrs = set()
    for k in range(64):
        pkt_addr, hdr_addr = rx.desc_read(k)
        assert hdr_addr == 0
        assert pkt_addr == rx.slots[k].data_iova
        addrs.add(pkt_addr)
    assert len(addrs) == 64
    assert rx.q.next == 0 and rx.q.in_multi == 0


def test_rxq_init_does_not_write_rdt():
    pool = Pool(64)
    _ring_owner, ring = aligned(64 * DESC)
    rdt = ffi.new("uint32_t *", 0xDEAD)
    q = ffi.new("struct ixyd_rxq *")
    assert lib.ixyd_rxq_init(q, ring, rdt, ffi.new("struct ixyd_pkt *[]", 64), pool.mp, 64) == 0
    assert rdt[0] == 0xDEAD


@pytest.mark.parametrize("size, count", [(64, 63), (48, 64), (4, 64), (0, 64)])
def test_rxq_init_refuses_small_pool_or_bad_size(size, count):
    pool = Pool(count)
    _ring_owner, ring = aligned(64 * DESC)
    q = ffi.new("struct ixyd_rxq *")
    slots = ffi.new("struct ixyd_pkt *[]", 64)
    assert lib.ixyd_rxq_init(q, ring, ffi.new("uint32_t *"), slots, pool.mp, size) == -1
    assert pool.free == count


def test_queues_accept_raw_addresses_cast_from_ints():
    """The driver passes DMA memory and BAR0 + offset as integers cast to pointers."""
    pool = Pool(128)
    _ring_owner, ring = aligned(2 * 64 * DESC)
    bar = ffi.new("uint32_t[]", 4)
    ring_addr, bar_addr = int(ffi.cast("uintptr_t", ring)), int(ffi.cast("uintptr_t", bar))
    rxq, txq = ffi.new("struct ixyd_rxq *"), ffi.new("struct ixyd_txq *")
    rx_slots, tx_slots = ffi.new("struct ixyd_pkt *[]", 64), ffi.new("struct ixyd_pkt *[]", 64)
    assert (
        lib.ixyd_rxq_init(
            rxq,
            ffi.cast("void *", ring_addr),
            ffi.cast("volatile uint32_t *", bar_addr),
            rx_slots,
            pool.mp,
            64,
        )
        == 0
    )
    assert (
        lib.ixyd_txq_init(
            txq,
            ffi.cast("void *", ring_addr + 64 * DESC),
            ffi.cast("volatile uint32_t *", bar_addr + 8),
            tx_slots,
            64,
        )
        == 0
    )
    assert lib.ixyd_tx_batch(txq, alloc(pool, 1), 1) == 1
    assert bar[2] == 1, "TDT written through the cast pointer"


def test_rx_batch_on_empty_ring_returns_nothing_and_leaves_rdt():
    rx = Rx(Pool(128))
    assert rx.batch() == []
    assert rx.rdt[0] == 63 and rx.q.next == 0


def test_rx_batch_returns_frames_in_order_and_keeps_rdt_one_behind():
    rx = Rx(Pool(128))
    for seq in range(5):
        assert rx.device_receive(frame(seq, 60 + seq), rss=0x1000 + seq, lo=0x21 + seq)
    pkts = rx.batch()
    assert [p.len for p in pkts] == [60, 61, 62, 63, 64]
    assert [bytes(ffi.buffer(p.data, p.len)) for p in pkts] == [frame(s, 60 + s) for s in range(5)]
    assert [p.rss_hash for p in pkts] == [0x1000 + s for s in range(5)]
    assert [p.rx_info for p in pkts] == [0x21 + s for s in range(5)]
    assert rx.rdt[0] == 4, "RDT is the last descriptor handed back, one behind next"
    assert rx.q.next == 5
    assert (rx.stats.packets, rx.stats.bytes) == (5, sum(range(60, 65)))


def test_rx_batch_rearms_with_fresh_buffer_and_clear_hdr_addr():
    pool = Pool(128)
    rx = Rx(pool)
    old = [rx.desc_read(k)[0] for k in range(3)]
    for seq in range(3):
        rx.device_receive(frame(seq))
    pkts = rx.batch()
    assert [p.data_iova for p in pkts] == old
    for k in range(3):
        pkt_addr, hdr_addr = rx.desc_read(k)
        assert hdr_addr == 0
        assert pkt_addr not in old
        assert pkt_addr == rx.slots[k].data_iova
    assert pool.free == 128 - 64 - 3


def test_rx_batch_takes_at_most_max():
    rx = Rx(Pool(128))
    for seq in range(10):
        rx.device_receive(frame(seq))
    assert len(rx.batch(4)) == 4
    assert rx.rdt[0] == 3
    assert [p.data[2] for p in rx.batch(32)] == list(range(4, 10))
    assert rx.rdt[0] == 9


def test_rx_ring_wraps_over_many_cycles_without_leaking():
    pool = Pool(200)
    rx = Rx(pool, size=64)
    seq = 0
    for cycle in range(40):
        burst = (cycle * 7) % 60 + 1
        for _ in range(burst):
            assert rx.device_receive(frame(seq))
            seq += 1
        got = rx.batch(32) + rx.batch(32)
        assert len(got) == burst
        assert rx.rdt[0] == (rx.q.next - 1) % 64
        assert pool.free == 200 - 64 - burst
        lib.ixyd_pkt_free_bulk(ffi.new("struct ixyd_pkt *[]", got), len(got))
    assert seq > 64 * 15
    assert pool.free == 200 - 64


def test_rx_ring_holds_at_most_size_minus_one_frames():
    rx = Rx(Pool(128), size=64)
    received = 0
    while rx.device_receive(frame(received)):
        received += 1
    assert received == 63, "one descriptor stays unused: RDT == RDH means no free descriptor"
    assert len(rx.batch(64)) == 63
    assert rx.device_receive(frame(99))


def test_rx_pool_exhaustion_drops_keeps_buffers_and_recovers():
    pool = Pool(64 + 4)
    rx = Rx(pool, size=64)
    before = [rx.desc_read(k)[0] for k in range(10)]
    for seq in range(10):
        rx.device_receive(frame(seq))
    pkts = rx.batch(32)
    assert [p.data[2] for p in pkts] == [0, 1, 2, 3]
    assert rx.stats.drop_no_buffer == 6
    assert pool.free == 0
    for k in range(4, 10):  # dropped frames: same buffer re-armed
        assert rx.desc_read(k) == (before[k], 0)
    assert rx.rdt[0] == 9, "dropped descriptors go back to the device too"
    lib.ixyd_pkt_free_bulk(ffi.new("struct ixyd_pkt *[]", pkts), len(pkts))
    for seq in range(10, 13):
        rx.device_receive(frame(seq))
    assert [p.data[2] for p in rx.batch(32)] == [10, 11, 12]
    assert rx.stats.drop_no_buffer == 6
    assert pool.free == 1


def test_rx_multi_descriptor_frame_is_dropped_once():
    pool = Pool(128)
    rx = Rx(pool)
    parts = [rx.desc_read(k)[0] for k in (1, 2, 3)]
    rx.device_receive(frame(0))
    rx.device_receive(b"x" * 1024, status=RX_DD)  # first part, no EOP
    rx.device_receive(b"y" * 1024, status=RX_DD)
    rx.device_receive(b"z" * 100, status=RX_DD | RX_EOP)  # last part
    rx.device_receive(frame(1))
    pkts = rx.batch()
    assert [p.data[2] for p in pkts] == [0, 1]
    assert rx.stats.drop_multi_descriptor == 1
    assert rx.stats.packets == 2 and rx.stats.drop_errors == rx.stats.drop_no_buffer == 0
    assert rx.q.in_multi == 0
    assert rx.rdt[0] == 4
    assert [rx.desc_read(k) for k in (1, 2, 3)] == [(a, 0) for a in parts], "parts re-armed"
    assert pool.free == 128 - 64 - 2


def test_rx_multi_descriptor_frame_across_the_ring_end_is_dropped_once():
    rx = Rx(Pool(128), size=64)
    for seq in range(63):
        rx.device_receive(frame(seq))
    assert len(rx.batch(63)) == 63
    rx.device_receive(b"x" * 1024, status=RX_DD)  # descriptor 63
    rx.device_receive(b"z" * 10, status=RX_DD | RX_EOP)  # descriptor 0
    rx.device_receive(frame(5))
    assert [p.data[2] for p in rx.batch()] == [5]
    assert rx.stats.drop_multi_descriptor == 1
    assert rx.q.next == 2 and rx.rdt[0] == 1


def test_rx_multi_descriptor_frame_straddling_batches_is_dropped_once():
    pool = Pool(128)
    rx = Rx(pool)
    rx.device_receive(frame(0))
    rx.device_receive(b"x" * 1024, status=RX_DD)
    assert [p.data[2] for p in rx.batch()] == [0]
    assert rx.q.in_multi == 1 and rx.stats.drop_multi_descriptor == 0
    rx.device_receive(b"y" * 1024, status=RX_DD)
    assert rx.batch() == []
    assert rx.q.in_multi == 1 and rx.rdt[0] == 2
    rx.device_receive(b"z" * 10, status=RX_DD | RX_EOP | RX_RXE)  # errors in a discarded frame
    rx.device_receive(frame(1))
    assert [p.data[2] for p in rx.batch()] == [1]
    assert rx.stats.drop_multi_descriptor == 1 and rx.stats.drop_errors == 0
    assert rx.q.in_multi == 0


def test_rx_batch_examines_at_most_max_descriptors_dropped_or_not():
    rx = Rx(Pool(128))
    rx.device_receive(b"x" * 1024, status=RX_DD)
    rx.device_receive(b"z" * 10, status=RX_DD | RX_EOP)
    rx.device_receive(frame(7))
    assert rx.batch(1) == [] and rx.rdt[0] == 0
    assert rx.batch(1) == [] and rx.rdt[0] == 1
    assert rx.stats.drop_multi_descriptor == 1
    assert [p.data[2] for p in rx.batch(1)] == [7] and rx.rdt[0] == 2


def test_rx_mac_error_frame_is_dropped_and_counted():
    pool = Pool(128)
    rx = Rx(pool)
    before = rx.desc_read(0)[0]
    rx.device_receive(frame(0), status=RX_DD | RX_EOP | RX_RXE)
    rx.device_receive(frame(1))
    assert [p.data[2] for p in rx.batch()] == [1]
    assert rx.stats.drop_errors == 1 and rx.stats.packets == 1
    assert rx.desc_read(0) == (before, 0)
    assert pool.free == 128 - 64 - 1


def test_rx_error_bit_is_per_family():
    """Bit 29 is RXE on the 82599 but L4E (a checksum error) on the 82576, whose RXE is
    bit 31: a queue drops only on the error bit its family's driver set."""
    rx = Rx(Pool(128))
    assert rx.q.error_mask == lib.IXYD_RXE_82599  # the default
    rx.q.error_mask = lib.IXYD_RXE_82576
    rx.device_receive(frame(0), status=RX_DD | RX_EOP | 0x20000000)  # 82576 L4E: keep
    rx.device_receive(frame(1), status=RX_DD | RX_EOP | 0x80000000)  # 82576 RXE: drop
    rx.device_receive(frame(2))
    assert [p.data[2] for p in rx.batch()] == [0, 2]
    assert rx.stats.drop_errors == 1


def test_rxq_free_all_returns_every_ring_buffer():
    pool = Pool(100)
    rx = Rx(pool)
    rx.device_receive(frame(0))
    pkts = rx.batch()
    assert lib.ixyd_rxq_free_all(rx.q) == 64
    lib.ixyd_pkt_free(pkts[0])
    assert pool.free == 100
    assert sorted(pool.free_indices()) == list(range(100))


# ------------------------------------------------------------------ TX


def test_txq_init_refuses_bad_size():
    _ring_owner, ring = aligned(128 * DESC)
    q = ffi.new("struct ixyd_txq *")
    slots = ffi.new("struct ixyd_pkt *[]", 128)
    for size in (0, 32, 96):
        assert lib.ixyd_txq_init(q, ring, ffi.new("uint32_t *"), slots, size) == -1
    assert lib.ixyd_txq_init(q, ring, ffi.new("uint32_t *"), slots, 64) == 0


def test_tx_batch_writes_data_descriptors_with_rs_only_on_every_32nd():
    pool = Pool(128)
    tx = Tx([pool], size=128)
    pkts = alloc(pool, 40)
    for k, p in enumerate(pkts):
        p.len = 60 + k
    assert tx.send(pkts[:25]) == 25
    assert tx.tdt[0] == 25
    assert tx.send(pkts[25:]) == 15
    assert tx.tdt[0] == 40
    for k, p in enumerate(pkts):
        addr, cmd, olinfo = struct.unpack_from("<QII", tx.ring, k * DESC)
        rs = TX_RS if k & 31 == 31 else 0
        assert addr == p.data_iova
        assert cmd == (60 + k) | TX_DTYP_DATA | TX_EOP | TX_IFCS | TX_DEXT | rs, f"descriptor {k}"
        assert olinfo == (60 + k) << 14
    assert (tx.q.stats.packets, tx.q.stats.bytes) == (40, sum(60 + k for k in range(40)))


def test_tx_batch_sends_frames_unchanged():
    pool = Pool(128)
    tx = Tx([pool])
    pkts = alloc(pool, 3)
    for seq, p in enumerate(pkts):
        data = frame(seq, 100)
        ffi.memmove(p.data, data, len(data))
        p.len = len(data)
    tx.send(pkts)
    tx.device_transmit()
    assert tx.wire == [frame(s, 100) for s in range(3)]


def test_tx_ring_full_returns_fewer_and_caller_keeps_the_rest():
    pool = Pool(200)
    tx = Tx([pool], size=64)
    pkts = alloc(pool, 70)
    for p in pkts:
        p.len = 64
    assert tx.send(pkts) == 63, "one descriptor stays unused: next tail == clean means full"
    assert tx.tdt[0] == 63
    assert tx.send(pkts[63:]) == 0
    assert tx.tdt[0] == 63
    assert tx.q.stats.drop_ring_full == 0, "tx_batch leaves drop accounting to the caller"
    tx.device_transmit()
    assert tx.send(pkts[63:]) == 7, "after DD on descriptor 31, the first 32 are reclaimed"
    assert pool.free == 200 - 70 + 32


def test_tx_cleanup_frees_in_groups_of_32_only_after_dd():
    pool = Pool(256)
    tx = Tx([pool], size=128)
    for p in (pkts := alloc(pool, 100)):
        p.len = 64
    assert tx.send(pkts) == 100
    assert pool.free == 156
    assert lib.ixyd_txq_reclaim(tx.q) == 0, "nothing done yet"
    tx.device_transmit(limit=31)
    assert lib.ixyd_txq_reclaim(tx.q) == 0, "DD only on the 32nd descriptor of a group"
    assert pool.free == 156
    tx.device_transmit(limit=1)
    assert lib.ixyd_txq_reclaim(tx.q) == 32
    assert tx.q.clean == 32 and pool.free == 188
    tx.device_transmit()
    assert lib.ixyd_txq_reclaim(tx.q) == 64, "groups 2 and 3; the last 4 wait for a 4th group"
    assert tx.q.clean == 96 and in_flight(tx) == 4
    assert pool.free == 252


def test_tx_cleanup_wraps_around_the_ring_many_times():
    pool = Pool(256)
    tx = Tx([pool], size=64)
    sent = 0
    for cycle in range(50):
        burst = alloc(pool, (cycle * 13) % 40 + 1)
        for p in burst:
            p.len = 64
        queued = tx.send(burst)
        lib.ixyd_pkt_free_bulk(
            ffi.new("struct ixyd_pkt *[]", burst[queued:]) if burst[queued:] else ffi.NULL,
            len(burst) - queued,
        )
        sent += queued
        tx.device_transmit()
        assert pool.free == 256 - in_flight(tx)
        assert tx.q.clean % 32 == 0
    assert sent > 64 * 10
    assert [d[0] for d in tx.descriptors] == [k % 64 for k in range(sent)]
    assert all(bool(cmd & TX_RS) == (index & 31 == 31) for index, _, cmd, _ in tx.descriptors)


def test_tx_cleanup_returns_buffers_to_their_own_pools():
    a, b = Pool(64, iova=0x10_0000), Pool(64, iova=0x90_0000)
    tx = Tx([a, b], size=64)
    pkts = [p for pair in zip(alloc(a, 16), alloc(b, 16), strict=True) for p in pair]
    for p in pkts:
        p.len = 64
    tx.send(pkts)
    tx.device_transmit()
    assert lib.ixyd_txq_reclaim(tx.q) == 32
    assert (a.free, b.free) == (64, 64)


def test_txq_free_all_returns_everything_in_flight():
    pool = Pool(128)
    tx = Tx([pool], size=64)
    for p in (pkts := alloc(pool, 50)):
        p.len = 64
    tx.send(pkts)
    tx.device_transmit(limit=40)
    assert lib.ixyd_txq_free_all(tx.q) == 50
    assert pool.free == 128
    assert (tx.q.clean, tx.q.tail) == (0, 0), "ring restarts at 0 for the next enable"
    assert lib.ixyd_txq_free_all(tx.q) == 0


# ------------------------------------------------------------------ forwarding


def make_forwarder(pool_size: int = 512, rx_size: int = 128, tx_size: int = 128):
    pool = Pool(pool_size)
    rx, tx = Rx(pool, rx_size), Tx([pool], tx_size)
    return pool, rx, tx, ffi.new("struct ixyd_fwd_stats *")


def test_forward_iterations_moves_frames_and_counts_empty_polls():
    _pool, rx, tx, st = make_forwarder()
    for seq in range(20):
        rx.device_receive(frame(seq, 64 + seq))
    assert lib.ixyd_forward_iterations(rx.q, tx.q, 8, 5, st) == 20
    assert (st.packets, st.iterations, st.empty_polls, st.drop_tx_full) == (20, 5, 2, 0)
    assert st.bytes == sum(64 + s for s in range(20))
    tx.device_transmit()
    for seq, sent in enumerate(tx.wire):
        expected = bytearray(frame(seq, 64 + seq))
        expected[1] += 1  # ixy-fwd touches byte 1 of every frame
        assert sent == bytes(expected)
    assert lib.ixyd_forward_iterations(rx.q, tx.q, 8, 3, st) == 0
    assert (st.packets, st.iterations, st.empty_polls) == (20, 8, 5), "stats accumulate"


def test_forward_keeps_pool_balanced_over_many_batches():
    pool, rx, tx, st = make_forwarder(pool_size=512, rx_size=128, tx_size=128)
    total = 0
    for cycle in range(60):
        burst = (cycle * 11) % 100 + 1
        for _ in range(burst):
            assert rx.device_receive(frame(total))
            total += 1
        lib.ixyd_forward_iterations(rx.q, tx.q, 32, 5, st)
        tx.device_transmit()
        assert pool.free == 512 - 128 - in_flight(tx)
    assert st.packets == total and st.drop_tx_full == 0
    assert [w[2] for w in tx.wire] == [s & 0xFF for s in range(total)]


def test_forward_drops_what_the_full_tx_ring_cannot_take():
    pool, rx, tx, st = make_forwarder(pool_size=512, rx_size=128, tx_size=64)
    for seq in range(100):
        rx.device_receive(frame(seq))
    assert lib.ixyd_forward_iterations(rx.q, tx.q, 64, 2, st) == 63
    assert st.drop_tx_full == 37
    assert st.bytes == 63 * 64
    assert pool.free == 512 - 128 - 63, "dropped frames went back to the pool"


def test_forward_batch_is_clamped_to_256():
    _pool, rx, tx, st = make_forwarder(pool_size=2048, rx_size=512, tx_size=512)
    for seq in range(300):
        rx.device_receive(frame(seq))
    assert lib.ixyd_forward_iterations(rx.q, tx.q, 100000, 1, st) == 256
    assert lib.ixyd_forward_iterations(rx.q, tx.q, 0, 1, st) == 1


def test_forward_runs_until_stop_flag_is_set():
    _pool, rx, tx, st = make_forwarder()
    for seq in range(10):
        rx.device_receive(frame(seq))
    stop = ffi.new("uint32_t *")
    timer = threading.Timer(0.05, lambda: stop.__setitem__(0, 1))
    timer.start()
    forwarded = lib.ixyd_forward(rx.q, tx.q, 32, stop, st)  # cffi releases the GIL
    timer.join()
    assert forwarded == 10 == st.packets
    assert st.iterations > 1 and st.empty_polls == st.iterations - 1


def test_forward_with_stop_already_set_does_nothing():
    _pool, rx, tx, st = make_forwarder()
    rx.device_receive(frame(0))
    assert lib.ixyd_forward(rx.q, tx.q, 32, ffi.new("uint32_t *", 1), st) == 0
    assert st.iterations == 0


def test_shutdown_returns_every_buffer_to_the_pool():
    pool, rx, tx, st = make_forwarder()
    for seq in range(90):
        rx.device_receive(frame(seq))
    lib.ixyd_forward_iterations(rx.q, tx.q, 32, 4, st)
    tx.device_transmit(limit=40)
    lib.ixyd_txq_reclaim(tx.q)
    assert lib.ixyd_txq_free_all(tx.q) + lib.ixyd_rxq_free_all(rx.q) == 90 - 32 + 128
    assert pool.free == pool.count
    assert sorted(pool.free_indices()) == list(range(pool.count))


# ------------------------------------------------------------------ MMIO


def test_mmio_helpers_access_one_32bit_word_at_a_byte_offset():
    bar = ffi.new("uint32_t[]", 8)
    lib.ixyd_mmio_write32(bar, 0x0C, 0xDEADBEEF)
    assert list(bar) == [0, 0, 0, 0xDEADBEEF, 0, 0, 0, 0]
    assert lib.ixyd_mmio_read32(bar, 0x0C) == 0xDEADBEEF
    assert lib.ixyd_mmio_read32(ffi.cast("uint32_t *", int(ffi.cast("uintptr_t", bar))), 0) == 0
