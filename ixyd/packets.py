"""Packets for Python code: batches of received frames as zero-copy memoryviews.

For people who process packets in Python. Receiving and sending a batch is one C call
each (`ixyd_rx_batch`, `ixyd_tx_batch`); what is left per packet is finding its view,
and that is kept to a dict lookup, a list index and a length check:

    batch = receive(rxq)           # up to 32 frames, one C call
    for frame in batch:            # memoryview of the frame bytes, in DMA memory
        frame[0:6] = frame[6:12]   # edits go straight into the buffer the NIC sends from
    transmit(txq, batch)           # one C call; the batch is empty afterwards

How views are made cheap: every pool entry is `struct ixyd_pkt` (128-byte header) followed
by the frame, at a fixed stride, in one DMA area. For each pool this module builds once a
memoryview of every entry's data area, a strided uint16 view of every entry's `len` field
and a dict from entry address to entry index. A batch reads its packet pointers as
integers in one `tolist()`, maps them to entries, and hands out the last view made of each
entry again while its length still matches (else a new slice). A batch therefore holds
packets of one pool only: the receive queue's pool, or the pool given to `allocate`.

Ownership, which nothing checks for you:
- A batch owns its packets until `transmit` (the TX ring takes them) or `free` (back to the
  pool); both leave it empty. Dropping a batch that still holds packets leaks them.
- A view is valid while its packet is in the batch. After `transmit` or `free` the buffer
  belongs to the NIC or the pool again: reading a stale view shows someone else's frame,
  writing to it corrupts one.
- `receive` and `allocate` reuse one batch (and its cffi array) per queue or pool as soon
  as that batch is empty, so a steady loop allocates nothing. Keep a batch across calls
  only while it holds packets; an empty batch may be refilled by the next call.
- Views over a pool become dangling when the pool's memory is freed (queue closed, port
  shut down): do not keep views past the packets' lifetime.
Batches are not thread-safe; like queues, each belongs to one thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from ._datapath import ffi, lib
from .drivers.rings import PKT_DATA_SIZE, PKT_HEADROOM, Mempool, RxQueue, TxQueue

DEFAULT_BATCH = 32  # ixy's and DPDK's usual burst
_LEN_OFFSET = ffi.offsetof("struct ixyd_pkt", "len")  # uint16 frame length in the header
_LEN_FORMAT = "H"
_POINTER_FORMAT = "P"  # a struct ixyd_pkt * read as an integer address

_NO_VIEW = memoryview(bytearray(0))  # no view made of an entry yet

__all__ = ["DEFAULT_BATCH", "PacketBatch", "allocate", "receive", "transmit"]


class _PoolViews:
    """Zero-copy views over one mempool: each entry's data area and its length field."""

    __slots__ = ("__weakref__", "entry_at", "frames", "lengths", "recent")

    def __init__(self, pool: Mempool):
        size = pool.entry_size
        whole = memoryview(ffi.buffer(ffi.cast("uint8_t *", pool.base), pool.count * size))
        # data[] of entry k, all PKT_DATA_SIZE bytes; sliced to the frame length per packet
        self.frames = [
            whole[k * size + PKT_HEADROOM : k * size + PKT_HEADROOM + PKT_DATA_SIZE]
            for k in range(pool.count)
        ]
        # entry k's `len` field is lengths[k]: entries are entry_size apart, an even stride
        self.lengths = whole.cast(_LEN_FORMAT)[_LEN_OFFSET // 2 :: size // 2]
        # packet address -> entry index; a dict lookup is cheaper than the arithmetic
        self.entry_at = {pool.base + k * size: k for k in range(pool.count)}.__getitem__
        # the last view made of entry k, handed out again while the frame length is the same:
        # a list index and a len() are cheaper than a new memoryview
        self.recent = [_NO_VIEW] * pool.count

    def view(self, k: int) -> memoryview:
        """Entry k's frame; reuses the last view of it when its length still matches."""
        try:
            view = self.recent[k]
            if len(view) == self.lengths[k]:
                return view
        except ValueError:  # the caller released it (memoryview.release or `with`)
            pass
        view = self.recent[k] = self.frames[k][: self.lengths[k]]
        return view


_pool_views: weakref.WeakKeyDictionary[Mempool, _PoolViews] = weakref.WeakKeyDictionary()


def _views_of(pool: Mempool) -> _PoolViews:
    views = _pool_views.get(pool)
    if views is None:
        views = _pool_views[pool] = _PoolViews(pool)
    return views


class PacketBatch:
    """Up to `capacity` packets of one pool: a cffi `struct ixyd_pkt *[]` and a count.

    `batch[i]` is a writable memoryview of frame i (its bytes in DMA memory, no copy);
    iterating yields every frame's view. The same buffer may be handed out as the same
    memoryview object again later. `pointers` is the cffi array for native code.
    """

    __slots__ = (
        "__weakref__",
        "_addresses",
        "_indices",
        "_views",
        "capacity",
        "count",
        "pointers",
        "pool",
    )

    def __init__(self, pool: Mempool, capacity: int = DEFAULT_BATCH):
        if capacity < 1:
            raise ValueError(f"a batch holds at least one packet, got capacity {capacity}")
        self.pointers = ffi.new("struct ixyd_pkt *[]", capacity)
        self.count = 0
        self.capacity = capacity
        self.pool = pool
        self._addresses = memoryview(ffi.buffer(self.pointers)).cast(_POINTER_FORMAT)
        self._views = _views_of(pool)
        self._indices: list[int] | None = None  # pool entry of each packet, computed on demand

    def __len__(self) -> int:
        return self.count

    def _entries(self) -> list[int]:
        indices = self._indices
        if indices is None:
            addresses = self._addresses[: self.count].tolist()
            try:
                indices = self._indices = list(map(self._views.entry_at, addresses))
            except KeyError as exc:
                raise ValueError(
                    f"packet at {exc.args[0]:#x} is not a buffer of this batch's pool"
                ) from None
        return indices

    def __getitem__(self, i: int) -> memoryview:
        """A writable view of frame i (negative i counts from the end). IndexError if absent."""
        return self._views.view(self._entries()[i])

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self.views())

    def views(self) -> list[memoryview]:
        """Writable views of every frame, in order: the cheapest way to touch them all."""
        views = self._views
        recent, lengths = views.recent, views.lengths
        entries = self._entries()
        try:  # the common case inline: the last view of the buffer has the right length
            return [recent[k] if len(recent[k]) == lengths[k] else views.view(k) for k in entries]
        except ValueError:  # a released view: let view() replace it
            return [views.view(k) for k in entries]

    def lengths(self) -> list[int]:
        """Frame lengths in bytes, in order."""
        lengths = self._views.lengths
        return [lengths[k] for k in self._entries()]

    def set_length(self, i: int, length: int) -> None:
        """Set frame i's length in bytes (0..2048); views taken before keep their old size."""
        if not 0 <= length <= PKT_DATA_SIZE:
            raise ValueError(f"a frame is 0..{PKT_DATA_SIZE} bytes long, got {length}")
        self._views.lengths[self._entries()[i]] = length

    def packet(self, i: int):
        """Packet i as a cffi `struct ixyd_pkt *` (rss_hash, rx_info, data_iova ...)."""
        if not -self.count <= i < self.count:
            raise IndexError(f"packet {i} of a batch of {self.count}")
        return self.pointers[i % self.count]

    def free(self) -> None:
        """Return every packet to its pool; the batch is empty afterwards."""
        if self.count:
            lib.ixyd_pkt_free_bulk(self.pointers, self.count)
        self._set_count(0)

    def _set_count(self, count: int) -> None:
        self.count = count
        self._indices = None


# One reusable batch per receive queue and per pool: refilled only once it is empty.
_rx_batches: weakref.WeakKeyDictionary[RxQueue, PacketBatch] = weakref.WeakKeyDictionary()
_alloc_batches: weakref.WeakKeyDictionary[Mempool, PacketBatch] = weakref.WeakKeyDictionary()


def _empty_batch(cache: weakref.WeakKeyDictionary, key, pool: Mempool, n: int) -> PacketBatch:
    batch = cache.get(key)
    if batch is None or batch.count or batch.capacity < n:
        batch = cache[key] = PacketBatch(pool, max(n, DEFAULT_BATCH))
    return batch


def receive(rxq: RxQueue, max_packets: int = DEFAULT_BATCH) -> PacketBatch:
    """Receive up to `max_packets` frames from `rxq` (one C call); the batch may be empty.

    The batch is the queue's reusable batch when that one is empty, else a new one. Raises
    ValueError for max_packets < 1.
    """
    if max_packets < 1:
        raise ValueError(f"max_packets must be at least 1, got {max_packets}")
    batch = _empty_batch(_rx_batches, rxq, rxq.pool, max_packets)
    batch._set_count(lib.ixyd_rx_batch(rxq.pointer, batch.pointers, max_packets))
    return batch


def transmit(txq: TxQueue, batch: PacketBatch) -> int:
    """Queue every packet of `batch` on `txq` (one C call); returns how many were queued.

    Sent buffers of earlier calls are reclaimed first, so call it even with an empty batch
    to keep a generator's pool from running dry. Packets the ring has no room for are
    freed and counted in the queue's `drop_ring_full` (as ixy-fwd does: queueing them would
    only add latency). Either way the batch is empty afterwards and can be reused.
    """
    n = batch.count
    sent = lib.ixyd_tx_batch(txq.pointer, batch.pointers, n)
    if sent < n:
        lib.ixyd_pkt_free_bulk(batch.pointers + sent, n - sent)
        txq.pointer.stats.drop_ring_full += n - sent
    batch._set_count(0)
    return sent


def allocate(pool: Mempool, n: int, frame_template: bytes) -> PacketBatch:
    """Take `n` buffers from `pool`, each holding a copy of `frame_template` (for generators).

    All or nothing: when the pool has fewer than n free buffers the batch is empty (send
    an empty batch with `transmit` to reclaim buffers, then try again). Raises ValueError
    for n < 1 or a template longer than a buffer (2048 bytes).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    length = len(frame_template)
    if length > PKT_DATA_SIZE:
        raise ValueError(f"a frame of {length} bytes does not fit a {PKT_DATA_SIZE}-byte buffer")
    batch = _empty_batch(_alloc_batches, pool, pool, n)
    if lib.ixyd_pkt_alloc_bulk(pool.pointer, batch.pointers, n) != n:
        batch._set_count(0)
        return batch
    batch._set_count(n)
    views = batch._views
    frames, lengths = views.frames, views.lengths
    for k in batch._entries():
        frames[k][:length] = frame_template
        lengths[k] = length
    return batch
