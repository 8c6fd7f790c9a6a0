"""Workers: pinned threads running the native worker loop, steered by a forwarding table.

A `Worker` owns some RX queues and some TX queues. Its thread runs `ixyd_worker_run` (C,
GIL released): it polls its RX queues in turn and handles each batch as the queue's
entry in the `ForwardingTable` says, runs packet generators on its TX queues and services
exception channels. The control plane changes entries, generators and the stop flag in
memory the loop reads; the loop never waits for it, takes no lock and makes no syscall.

Forwarding modes, per RX queue (`ForwardingTable.set`):
  drop       free every frame (counted as dropped_by_mode)
  port       send on `tx`, a TX queue of another port
  reflect    send on `tx`, a TX queue of the receiving port; swap_mac=True swaps the MACs
  exception  hand frames to a host thread through the queue's `ExceptionChannel`; frames
             the host sends go out of `tx` (still after the queue leaves exception mode,
             so nothing the host has handed over is lost)
A change takes effect between two batches: each frame is handled under exactly one entry.
Packet generators (`Worker.generate`) are per TX queue and run between polls.

Who may free into which pool (mempools have no atomics; datapath.h has the full rules):
- While a worker runs, only its thread allocates from or frees into the pools of its RX
  queues and generators, and only it sends on or cleans its TX queues. So every RX queue,
  TX queue and generator pool belongs to exactly one worker; building a second worker on
  any of them raises ConfigError.
- A host thread using an ExceptionChannel never frees: it gives every buffer back through
  the channel it came from, and the worker frees it. The channel's host side is bound to
  one thread.
- `ixyd.forward.ForwardWorker` does not take part in this bookkeeping: do not give it a
  queue a Worker owns.
- Python frees into a worker's pools only while its thread is not running (`close`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._datapath import ffi, lib
from .capture import DEFAULT_RING, CaptureRing
from .drivers.rings import PKT_DATA_SIZE, Mempool, RxQueue, TxQueue, free_packets, write_packet
from .errors import ConfigError, DmaError

MODES = {
    "drop": lib.IXYD_MODE_DROP,
    "port": lib.IXYD_MODE_PORT,
    "reflect": lib.IXYD_MODE_REFLECT,
    "exception": lib.IXYD_MODE_EXCEPTION,
}
_ARGS = {  # arguments each mode takes; tx is required where it is listed
    "drop": (),
    "port": ("tx", "swap_mac"),
    "reflect": ("tx", "swap_mac"),
    "exception": ("tx",),
}
WORKER_STATS_FIELDS = ("iterations", "polls", "empty_polls", "packets", "bytes", "generated")
QUEUE_STATS_FIELDS = (
    "packets",
    "bytes",
    "sent",
    "dropped_by_mode",
    "drop_tx_full",
    "to_host",
    "drop_exception_full",
    "from_host",
    "drop_from_host",
)
GENERATOR_STATS_FIELDS = ("sent", "bytes", "no_buffer")
MIN_FRAME = 60  # an Ethernet frame without FCS
SEQ_BYTES = 8  # generator sequence numbers: 64-bit little-endian
MAX_RATE = 1_000_000_000  # frames per second; keeps the C token bucket within 64 bits
GENERATOR_HANDOVER_TIMEOUT = 1.0  # seconds a running worker may take to finish a round
DEFAULT_EXCEPTION_RING = 256

# Which worker owns each RX queue, TX queue and pool (see the module docstring).
_owners: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


def check_cpu(cpu: int) -> None:
    """Raise ConfigError unless `cpu` exists and this process may run on it."""
    if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 0:
        raise ConfigError(f"a CPU is a non-negative integer, got {cpu!r}")
    allowed = os.sched_getaffinity(0)
    if cpu in allowed:
        return
    total = os.cpu_count() or 0
    if cpu >= total:
        raise ConfigError(f"CPU {cpu} does not exist: this machine has CPUs 0-{total - 1}")
    raise ConfigError(f"CPU {cpu} is not available to ixyd (allowed: {sorted(allowed)})")


class PinnedLoop:
    """A native loop in a thread of its own, pinned to `cpu` (None: the process' CPUs).

    `loop(stop)` is a cffi call that releases the GIL and runs until `*stop` is 1; other
    values of the flag belong to the loop (ixyd_worker_run's STALL). start() waits until
    the thread is pinned and raises what pinning raised; what the loop raises later is
    kept in `error` for the control plane.
    """

    def __init__(self, name: str, cpu: int | None, loop: Callable[[Any], object]):
        if cpu is not None:
            check_cpu(cpu)
        self.name, self.cpu = name, cpu
        self.stop_flag = ffi.new("uint32_t *")
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.native_id: int | None = None  # the thread's kernel id while it runs
        self.error: BaseException | None = None

    def start(self, timeout: float = 5.0) -> None:
        if self._thread:
            return
        self.stop_flag[0] = 0
        self.error = None
        self._started.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"{self.name!r} did not start within {timeout} s")
        if self.error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self.error

    def _run(self) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})  # pid 0: this thread only
            self.native_id = threading.get_native_id()
        except BaseException as exc:  # handed to start()
            self.error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop(self.stop_flag)
        except BaseException as exc:  # reported through .error; the control plane decides
            self.error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop and wait for it (it checks the flag every round)."""
        if not self._thread:
            return
        self.stop_flag[0] = 1
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name!r} did not stop within {timeout} s")
        self._thread = None
        self.native_id = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _claim(objects: Iterable[object], worker: str) -> None:
    """Record `worker` as the owner of each object, or raise ConfigError without claiming any."""
    objects = list(objects)
    if len({id(obj) for obj in objects}) != len(objects):
        raise ConfigError(f"worker {worker!r}: a queue or pool is listed twice")
    with _owners_lock:
        for obj in objects:
            owner = _owners.get(obj)
            if owner is not None:
                raise ConfigError(f"{_describe(obj)} already belongs to worker {owner!r}")
        for obj in objects:
            _owners[obj] = worker


def _release(objects: Iterable[object]) -> None:
    with _owners_lock:
        for obj in objects:
            _owners.pop(obj, None)


def _describe(obj: object) -> str:
    if isinstance(obj, RxQueue):
        return f"RX queue {obj.index}"
    if isinstance(obj, TxQueue):
        return f"TX queue {obj.index}"
    return f"mempool of {obj.count} buffers" if isinstance(obj, Mempool) else repr(obj)


# --------------------------------------------------------------------------- table


@dataclass
class _Entry:
    pointer: object  # struct ixyd_fwd_entry *, read by the worker
    worker: Worker
    mode: str = "drop"
    tx: TxQueue | None = None
    swap_mac: bool = False


class ForwardingTable:
    """The forwarding entries of all workers' RX queues, in memory the workers read.

    Workers register their RX queues when they are built; an entry starts as `drop`.
    Writers are serialised here; a worker never waits for a writer (one 64-bit word per
    entry, loaded once per batch).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[RxQueue, _Entry] = {}

    def _register(self, rxq: RxQueue, worker: Worker) -> object:
        entry = _Entry(ffi.new("struct ixyd_fwd_entry *"), worker)
        with self._lock:
            self._entries[rxq] = entry
        return entry.pointer

    def _unregister(self, rxq: RxQueue) -> None:
        with self._lock:
            self._entries.pop(rxq, None)

    def _entry(self, rxq: RxQueue) -> _Entry:
        try:
            return self._entries[rxq]
        except (KeyError, TypeError):
            raise ConfigError(
                f"{_describe(rxq)} is not served by any worker of this table"
            ) from None

    def set(self, rx_queue: RxQueue, mode: str, **args) -> int:
        """Steer `rx_queue`: mode is drop, port (tx=), reflect (tx=, swap_mac=) or
        exception (tx=). Returns the entry's new generation. Raises ConfigError for an
        unknown queue or mode, a missing or unexpected argument, a TX queue the queue's
        worker does not own, or exception mode on a queue without an exception channel."""
        entry = self._entry(rx_queue)
        if mode not in MODES:
            raise ConfigError(f"unknown forwarding mode {mode!r}; one of {', '.join(MODES)}")
        unexpected = sorted(set(args) - set(_ARGS[mode]))
        if unexpected:
            takes = ", ".join(_ARGS[mode]) or "no arguments"
            raise ConfigError(f"mode {mode} takes {takes}, not {', '.join(unexpected)}")
        tx, swap_mac = args.get("tx"), args.get("swap_mac", False)
        if not isinstance(swap_mac, bool):
            raise ConfigError(f"swap_mac must be True or False, got {swap_mac!r}")
        worker = entry.worker
        index = 0
        if "tx" in _ARGS[mode]:
            if tx is None:
                raise ConfigError(f"mode {mode} needs tx=<TX queue>")
            index = worker._tx_index(tx)
        if mode == "exception" and rx_queue not in worker._channels:
            raise ConfigError(
                f"{_describe(rx_queue)} has no exception channel; list it in "
                f"exception_queues= when building worker {worker.name!r}"
            )
        flags = lib.IXYD_FWD_SWAP_MAC if swap_mac else 0
        with self._lock:
            if lib.ixyd_fwd_entry_set(entry.pointer, MODES[mode], flags, index):
                raise ConfigError(f"cannot encode mode {mode} with TX index {index}")
            entry.mode, entry.tx, entry.swap_mac = mode, tx, swap_mac
            return self._generation(entry)

    def get(self, rx_queue: RxQueue) -> dict:
        """The entry: mode, tx, swap_mac, generation and whether its worker applies it yet."""
        entry = self._entry(rx_queue)
        with self._lock:
            return {
                "mode": entry.mode,
                "tx": entry.tx,
                "swap_mac": entry.swap_mac,
                "generation": self._generation(entry),
                "applied": self.applied(rx_queue),
            }

    def applied(self, rx_queue: RxQueue) -> bool:
        """Whether the queue's worker handles every batch it polls from now on by the entry."""
        entry = self._entry(rx_queue)
        return entry.worker._applied_word(rx_queue) == entry.pointer.word

    def wait_applied(self, rx_queue: RxQueue, timeout: float = 1.0) -> None:
        """Wait until the worker applies the entry (it must be running); TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while not self.applied(rx_queue):
            if time.monotonic() > deadline:
                worker = self._entry(rx_queue).worker
                state = "running" if worker.running else "not running"
                raise TimeoutError(
                    f"worker {worker.name!r} ({state}) has not applied the entry of "
                    f"{_describe(rx_queue)} within {timeout} s"
                )
            time.sleep(0.0005)

    @staticmethod
    def _generation(entry: _Entry) -> int:
        return entry.pointer.word >> lib.IXYD_FWD_GEN_SHIFT


# --------------------------------------------------------------------------- exception path


class ExceptionChannel:
    """The host end of one RX queue's exception path (the TAP bridge uses it).

    Frames the worker receives in exception mode arrive here (`receive`, or `pop` +
    `give_back` without copying); frames for the wire go the other way (`send`, or
    `take_empty` + `push`). The host side never frees a buffer: it hands each one back to
    the worker, which frees or sends it. One thread at a time may use the host side: the
    first caller binds it until `release_host` or until that thread ends.
    """

    def __init__(self, rxq: RxQueue, size: int = DEFAULT_EXCEPTION_RING):
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size & (size - 1)
            or not (2 <= size <= 65536)
        ):
            raise ConfigError(f"exception ring size must be a power of two in 2..65536, got {size}")
        self.rx_queue, self.size = rxq, size
        self.pointer = ffi.new("struct ixyd_exception *")
        self._slots = ffi.new("struct ixyd_pkt *[]", 4 * size)
        if lib.ixyd_exception_init(self.pointer, self._slots, size):
            raise ConfigError(f"cannot lay out exception rings of {size} slots")
        self._scratch = ffi.new("struct ixyd_pkt *[]", size)
        self._host: threading.Thread | None = None
        self.held = 0  # buffers popped by the host and not yet handed back

    # -- host side, zero-copy
    def pop(self, max_frames: int = 32) -> list:
        """Take up to max_frames received frames (`struct ixyd_pkt *`); hand each one back
        with `give_back` or `push`. `packet_view` gives a frame's bytes without a copy."""
        self._bind_host()
        n = lib.ixyd_spsc_pop(self._ring("to_host"), self._scratch, min(max_frames, self.size))
        self.held += n
        return list(self._scratch[0:n])

    def give_back(self, packets: Sequence) -> int:
        """Return buffers the host is done with; returns how many were taken (the host still
        owns the rest and should try again)."""
        return self._push("returned", packets)

    def take_empty(self, n: int = 32) -> list:
        """Take up to n empty buffers (data holds PKT_DATA_SIZE bytes) to carry frames to the
        wire; set `len`, then `push` them (or `give_back` the unused ones)."""
        self._bind_host()
        got = lib.ixyd_spsc_pop(self._ring("empty"), self._scratch, min(n, self.size))
        self.held += got
        return list(self._scratch[0:got])

    def push(self, packets: Sequence) -> int:
        """Hand frames to the worker to send; returns how many were taken."""
        return self._push("to_wire", packets)

    # -- host side, copying
    def receive(self, max_frames: int = 32) -> list[bytes]:
        """Up to max_frames received frames, copied out; their buffers go back at once."""
        self._bind_host()
        room = self.size - lib.ixyd_spsc_count(self._ring("returned"))
        packets = self.pop(min(max_frames, room))
        frames = [bytes(ffi.buffer(p.data, p.len)) for p in packets]
        self.give_back(packets)  # fits: at most `room` buffers, and only we fill that ring
        return frames

    def send(self, frames: Sequence[bytes]) -> int:
        """Copy frames into empty buffers and hand them to the worker; returns how many were
        taken (0 while the worker has given no empty buffers yet, e.g. not in exception mode)."""
        self._bind_host()
        for frame in frames:
            if len(frame) > PKT_DATA_SIZE:
                raise ValueError(f"a frame of {len(frame)} bytes exceeds {PKT_DATA_SIZE} bytes")
        room = self.size - lib.ixyd_spsc_count(self._ring("to_wire"))
        packets = self.take_empty(min(len(frames), room))
        for packet, frame in zip(packets, frames[: len(packets)], strict=True):
            write_packet(packet, frame)
        self.push(packets)  # fits: at most `room` buffers, and only we fill that ring
        return len(packets)

    def bind_host(self) -> None:
        """Bind the host side to the calling thread before native code (the TAP bridge's
        C loop, ixyd/tap.py) uses the rings directly; RuntimeError if another thread has it.
        Such code keeps its own count of the buffers it holds (`held` here does not see them)."""
        self._bind_host()

    def release_host(self) -> None:
        """Unbind the host side from the calling thread (another thread may use it next)."""
        self._bind_host()
        self._host = None

    @property
    def pending(self) -> dict[str, int]:
        """Buffers in each ring now."""
        return {name: lib.ixyd_spsc_count(self._ring(name)) for name in _RINGS}

    # -- internals
    def _ring(self, name: str):
        return ffi.addressof(self.pointer, name)

    def _push(self, ring: str, packets: Sequence) -> int:
        self._bind_host()
        if not packets:
            return 0
        pool = self.rx_queue.pool.pointer
        if any(p.pool != pool for p in packets):  # another worker's pool: it would free it
            raise ValueError(
                f"a buffer handed back to the exception channel of {_describe(self.rx_queue)} "
                "did not come from it"
            )
        n = lib.ixyd_spsc_push(
            self._ring(ring), ffi.new("struct ixyd_pkt *[]", packets), len(packets)
        )
        self.held -= n
        return n

    def _bind_host(self) -> None:
        me = threading.current_thread()
        if self._host is None or not self._host.is_alive():
            self._host = me
        elif self._host is not me:
            raise RuntimeError(
                f"the exception channel of {_describe(self.rx_queue)} is used by thread "
                f"{self._host.name!r}; a ring has one producer and one consumer"
            )

    def _drain(self) -> int:
        """Free every buffer in the rings; only once no worker or host thread uses them."""
        freed = 0
        for name in _RINGS:
            while n := lib.ixyd_spsc_pop(self._ring(name), self._scratch, self.size):
                lib.ixyd_pkt_free_bulk(self._scratch, n)
                freed += n
        return freed


_RINGS = ("to_host", "to_wire", "returned", "empty")


def packet_view(packet, length: int | None = None):
    """A zero-copy buffer over a packet's frame (`length` bytes, default its `len`)."""
    return ffi.buffer(packet.data, packet.len if length is None else length)


# --------------------------------------------------------------------------- generator


class Generator:
    """Copies of a template frame sent on one TX queue at `rate` frames/s (0: as fast as the
    ring takes them), `count` in all (0: no limit), with a 64-bit little-endian sequence
    number at byte `seq_offset` (None: none) counting up from `first_seq`."""

    def __init__(
        self,
        txq: TxQueue,
        pool: Mempool,
        frame: bytes,
        *,
        rate: int = 0,
        count: int = 0,
        seq_offset: int | None = None,
        first_seq: int = 0,
        template=None,
    ):
        if not MIN_FRAME <= len(frame) <= PKT_DATA_SIZE:
            raise ConfigError(
                f"frame size must be {MIN_FRAME}..{PKT_DATA_SIZE} bytes, got {len(frame)}"
            )
        for name, value, top in (
            ("rate", rate, MAX_RATE),
            ("count", count, 2**63),
            ("first_seq", first_seq, 2**64 - 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise ConfigError(f"{name} must be an integer in 0..{top}, got {value!r}")
        if seq_offset is not None and (
            isinstance(seq_offset, bool)
            or not isinstance(seq_offset, int)
            or not 0 <= seq_offset <= len(frame) - SEQ_BYTES
        ):
            raise ConfigError(
                f"seq_offset must leave {SEQ_BYTES} bytes inside the {len(frame)}-byte frame, "
                f"got {seq_offset!r}"
            )
        self.txq, self.pool = txq, pool
        self.retired_round: int | None = None  # the worker's round when it was stopped
        self.handed_over = False  # its pool and template went to a successor
        if template is None:  # before the worker sees the pool: this thread may allocate
            allocated = pool.alloc(1)
            if not allocated:
                raise DmaError("the generator's pool has no free buffer for the template")
            template = allocated[0]
        write_packet(template, frame)
        self.pointer = ffi.new("struct ixyd_generator *")
        g = self.pointer
        g.pool, g.frame, g.size = pool.pointer, template, len(frame)
        g.rate, g.count, g.seq = rate, count, first_seq
        g.seq_offset = lib.IXYD_GEN_NO_SEQ if seq_offset is None else seq_offset

    @property
    def done(self) -> bool:
        """Whether all `count` frames are queued for sending."""
        return bool(self.pointer.done)

    @property
    def stats(self) -> dict[str, int]:
        """sent, bytes (queued on the TX ring) and no_buffer (batches the pool could not fill)."""
        return {name: getattr(self.pointer, name) for name in GENERATOR_STATS_FIELDS}


# --------------------------------------------------------------------------- worker


class Worker(PinnedLoop):
    """A thread running the native worker loop over `rx_queues`, sending on `tx_queues`.

    Each RX queue gets an entry in `table` (initially drop). cpu: pin the thread there
    (None: inherit the affinity). batch: frames per RX poll, 1..IXYD_MAX_BATCH.
    exception_queues: the RX queues that get an ExceptionChannel of `exception_ring` slots.
    Raises ConfigError for a bad CPU or batch, or a queue that belongs to another worker.
    """

    def __init__(
        self,
        table: ForwardingTable,
        rx_queues: Sequence[RxQueue],
        tx_queues: Sequence[TxQueue],
        *,
        cpu: int | None = None,
        batch: int = 32,
        name: str = "ixyd-worker",
        exception_queues: Iterable[RxQueue] = (),
        exception_ring: int = DEFAULT_EXCEPTION_RING,
    ):
        if (
            isinstance(batch, bool)
            or not isinstance(batch, int)
            or not 1 <= batch <= lib.IXYD_MAX_BATCH
        ):
            raise ConfigError(f"batch size must be 1..{lib.IXYD_MAX_BATCH}, got {batch!r}")
        if cpu is not None:
            check_cpu(cpu)
        rx_queues, tx_queues = list(rx_queues), list(tx_queues)
        if not rx_queues and not tx_queues:
            raise ConfigError(f"worker {name!r} has neither RX nor TX queues")
        if len(tx_queues) > lib.IXYD_FWD_TXQ_MASK:
            raise ConfigError(f"a worker has at most {lib.IXYD_FWD_TXQ_MASK} TX queues")
        exception_queues = list(exception_queues)
        stray = [q for q in exception_queues if q not in rx_queues]
        if stray:
            raise ConfigError(f"{_describe(stray[0])} is in exception_queues but not in rx_queues")
        self.table, self.name, self.cpu, self.batch = table, name, cpu, batch
        self.rx_queues, self.tx_queues = rx_queues, tx_queues
        self._owned: list[object] = [*rx_queues, *(q.pool for q in rx_queues), *tx_queues]
        _claim(self._owned, name)
        try:
            self._channels = {q: ExceptionChannel(q, exception_ring) for q in exception_queues}
        except BaseException:
            _release(self._owned)
            raise
        self._queues = ffi.new("struct ixyd_worker_queue[]", max(len(rx_queues), 1))
        for k, rxq in enumerate(rx_queues):
            self._queues[k].rxq = rxq.pointer
            self._queues[k].entry = table._register(rxq, self)
            channel = self._channels.get(rxq)
            self._queues[k].exception = channel.pointer if channel else ffi.NULL
        self._txqs = ffi.new("struct ixyd_txq *[]", [q.pointer for q in tx_queues] or [ffi.NULL])
        self._generator_slots = ffi.new("struct ixyd_generator *[]", max(len(tx_queues), 1))
        self.pointer = ffi.new("struct ixyd_worker *")
        if lib.ixyd_worker_init(
            self.pointer,
            self._queues,
            len(rx_queues),
            self._txqs,
            self._generator_slots,
            len(tx_queues),
            batch,
        ):
            self._unregister()
            raise ConfigError(f"worker {name!r}: a queue is not set up (fill the RX queues first)")
        self._generators: dict[TxQueue, Generator] = {}
        self._retired: list[Generator] = []  # kept until close: their buffers may be in flight
        self._capture_rings: dict[int, CaptureRing] = {}  # by RX queue index, see capture_ring
        pointer = self.pointer
        super().__init__(name, cpu, lambda stop: lib.ixyd_worker_run(pointer, stop))
        self.closed = False

    # -- running (start, stop, running, native_id, error: PinnedLoop's)
    def start(self, timeout: float = 5.0) -> None:
        """Start the thread and wait until it is pinned; raises what pinning raised."""
        if self.closed:
            raise RuntimeError(f"worker {self.name!r} is closed")
        super().start(timeout)

    def stall(self) -> None:
        """Fault injection, a test aid: make the running loop spin without polling or
        counting rounds, as a hung worker would (the watchdog's test). stop() ends it."""
        if not self.running:
            raise RuntimeError(f"worker {self.name!r} is not running")
        self.stop_flag[0] = lib.IXYD_WORKER_STALL

    def run_iterations(self, rounds: int = 1) -> int:
        """Run rounds of the loop in the calling thread (step-mode tests); frames received."""
        self._require_stopped("run_iterations")
        return lib.ixyd_worker_iterations(self.pointer, rounds)

    # -- generators
    def generate(self, txq: TxQueue, frame: bytes, *, pool: Mempool, **settings) -> Generator:
        """Start a generator on txq (one of this worker's TX queues), replacing any running
        there. The worker takes `pool` over (its buffers must be DMA-mapped for txq's
        device) and closes it in `close`. settings: rate, count, seq_offset, first_seq (see
        Generator). Raises ConfigError for bad settings or a pool another worker owns."""
        if self.closed:
            raise RuntimeError(f"worker {self.name!r} is closed")
        index = self._tx_index(txq)
        _claim([pool], self.name)
        try:
            generator = Generator(txq, pool, frame, **settings)
        except BaseException:
            _release([pool])
            raise
        self._owned.append(pool)
        self.stop_generator(txq)
        self._generators[txq] = generator
        lib.ixyd_worker_set_generator(self.pointer, index, generator.pointer)
        return generator

    def stop_generator(self, txq: TxQueue) -> None:
        """Stop txq's generator (it sends nothing more from the worker's next round on)."""
        generator = self._generators.pop(txq, None)
        if generator is not None:
            lib.ixyd_worker_set_generator(self.pointer, self._tx_index(txq), ffi.NULL)
            generator.retired_round = self.pointer.stats.iterations
            self._retired.append(generator)

    def restart_generator(self, txq: TxQueue, frame: bytes, **settings) -> Generator:
        """Start a new generator on txq with the pool and template buffer of the last one
        stopped there, so switching a port in and out of generating costs no new DMA
        memory. settings as for `generate`. Raises ConfigError when txq never had a
        generator, TimeoutError when a running worker does not finish its round."""
        self.stop_generator(txq)  # a running one becomes the last stopped
        old = next((g for g in reversed(self._retired) if g.txq is txq and not g.handed_over), None)
        if self.closed or old is None:
            raise ConfigError(f"{_describe(txq)} has no stopped generator in {self.name!r}")
        # the template is ours again once the worker began a round after the stop: the
        # round that was running may still be copying from it
        deadline = time.monotonic() + GENERATOR_HANDOVER_TIMEOUT
        while self.running and self.pointer.stats.iterations < old.retired_round + 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name!r} made no round for its generator")
            time.sleep(0.0005)
        generator = Generator(txq, old.pool, frame, template=old.pointer.frame, **settings)
        old.handed_over = True
        self._generators[txq] = generator
        lib.ixyd_worker_set_generator(self.pointer, self._tx_index(txq), generator.pointer)
        return generator

    # -- exception path
    def exception(self, rxq: RxQueue) -> ExceptionChannel:
        """The exception channel of one of this worker's RX queues."""
        try:
            return self._channels[rxq]
        except KeyError:
            raise ConfigError(
                f"{_describe(rxq)} has no exception channel in worker {self.name!r}"
            ) from None

    # -- capture
    def capture_ring(self, rxq: RxQueue, size: int | None = None) -> CaptureRing:
        """The capture ring of one of this worker's RX queues, made on first use (`size`
        slots, default capture.DEFAULT_RING) and kept until close: after a disarm the
        worker may still be copying into it. ConfigError if it exists with another size."""
        index = self._rx_index(rxq)
        ring = self._capture_rings.get(index)
        if ring is None:
            ring = self._capture_rings[index] = CaptureRing(size or DEFAULT_RING)
        elif size is not None and size != ring.size:
            raise ConfigError(f"{_describe(rxq)} already has a capture ring of {ring.size} slots")
        return ring

    def capture_stats(self, rxq: RxQueue) -> dict[str, int]:
        """rxq's capture counters since its ring was made: frames copied into the ring
        (captured) and copies dropped because it was full (dropped); zero without a ring."""
        ring = self._capture_rings.get(self._rx_index(rxq))
        return ring.stats if ring is not None else {"captured": 0, "dropped": 0}

    def set_capture(self, rxq: RxQueue, ring: CaptureRing | None) -> None:
        """Arm capture into `ring` (from capture_ring) for rxq, or disarm with None; the
        worker copies every batch it receives there from its next batch on."""
        index = self._rx_index(rxq)
        if ring is not None and self._capture_rings.get(index) is not ring:
            raise ConfigError(f"that capture ring is not {_describe(rxq)}'s in {self.name!r}")
        lib.ixyd_worker_set_capture(self.pointer, index, ring.pointer if ring else ffi.NULL)

    # -- counters
    @property
    def stats(self) -> dict[str, int]:
        """The loop's counters: iterations, polls, empty_polls, packets, bytes, generated."""
        s = self.pointer.stats
        return {name: getattr(s, name) for name in WORKER_STATS_FIELDS}

    def queue_stats(self, rxq: RxQueue) -> dict[str, int]:
        """One RX queue's counters: frames received, sent, and dropped by reason."""
        s = self._queues[self._rx_index(rxq)].stats
        return {name: getattr(s, name) for name in QUEUE_STATS_FIELDS}

    # -- shutdown
    def close(self) -> None:
        """Stop, then give every buffer in the exception rings and generator templates back
        to its pool, close the generator pools and release the queues. Buffers still in the
        TX rings go back when the TX queues close. Call it after the host threads of the
        exception channels have stopped."""
        if self.closed:
            return
        self.stop()
        for txq in list(self._generators):
            self.stop_generator(txq)
        for channel in self._channels.values():
            channel._drain()
        kept = [g for g in self._retired if not g.handed_over]  # each pool and template once
        free_packets([g.pointer.frame for g in kept])
        for generator in kept:
            generator.pool.close()
        self._retired.clear()
        self._unregister()
        self.closed = True

    def _unregister(self) -> None:
        for rxq in self.rx_queues:
            self.table._unregister(rxq)
        _release(self._owned)

    # -- internals
    def _require_stopped(self, what: str) -> None:
        if self.running:
            raise RuntimeError(f"{what}: worker {self.name!r} is running in its own thread")
        if self.closed:
            raise RuntimeError(f"{what}: worker {self.name!r} is closed")

    def _tx_index(self, txq: TxQueue) -> int:
        for k, q in enumerate(self.tx_queues):
            if q is txq:
                return k
        raise ConfigError(
            f"{_describe(txq)} is not one of worker {self.name!r}'s TX queues; a TX queue "
            f"belongs to one worker, given when it is built"
        )

    def _rx_index(self, rxq: RxQueue) -> int:
        for k, q in enumerate(self.rx_queues):
            if q is rxq:
                return k
        raise ConfigError(f"{_describe(rxq)} is not one of worker {self.name!r}'s RX queues")

    def _applied_word(self, rxq: RxQueue) -> int:
        return self._queues[self._rx_index(rxq)].stats.applied
