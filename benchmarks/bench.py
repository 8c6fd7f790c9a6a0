#!/usr/bin/env python3
"""ixyd benchmarks on the 82599 model: prints the machine and one table of figures.

    .venv/bin/python benchmarks/bench.py            # the full run, about 45 s
    .venv/bin/python benchmarks/bench.py --quick    # fewer windows and packets, about 25 s

Sections (docs/benchmarks.md explains each figure):
  a. model throughput through a cable: frames/s the model carries A -> B, in a closed loop
     with a C forwarder sending B's RX back out of A (thread mode)
  b. instructions per forwarded packet of ixyd_forward_iterations, by batch size, counted
     by callgrind in step mode (this script re-runs itself under valgrind for each batch)
  c. forwarded packets/s, generator -> A -> C forwarder -> B -> checker (thread mode)
  d. the Python packet API (ixyd.packets) vs a pure-Python ixy.py-like loop on the same
     rings: receive, touch one byte, transmit (step mode, only the Python side timed)
  e. packet capture: instructions per packet of the worker loop with and without a capture
     armed (callgrind, step mode), and the worker's forwarding rate with a capture session
     running vs not, in alternating windows (thread mode)

Thread-mode figures share the machine's cores between the model's engine thread and the
forwarder thread (two busy threads); they measure the model as much as the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from ixyd._datapath import ffi, lib  # noqa: E402

from ixyd.capture import MAX_SNAPLEN, CaptureSession, CaptureSource  # noqa: E402
from ixyd.drivers.config import PortConfig  # noqa: E402
from ixyd.drivers.ixgbe import IxgbePort  # noqa: E402
from ixyd.drivers.rings import PKT_HEADROOM, RxQueue, TxQueue  # noqa: E402
from ixyd.model import ModelNic  # noqa: E402
from ixyd.packets import allocate, receive, transmit  # noqa: E402
from ixyd.worker import ForwardingTable, Worker  # noqa: E402

FRAME_SIZE = 60  # a 64-byte frame on the wire, without its 4-byte FCS
RING = 512  # descriptors per ring (ixy's default)
CONFIG = PortConfig(rx_ring=RING, tx_ring=RING, link_timeout=2.0)
BATCH_SIZES = (1, 8, 32, 64)
CALLGRIND_FUNCTION = "ixyd_forward_iterations"  # the only toggle: nested toggles cancel out
# ixy C and ixy.rs, instructions per packet at batch 32
# (docs/reference/peers.md#instructions-per-packet)
ANCHORS = {"ixy C (b=32)": 127, "ixy.rs (b=32)": 209}


@dataclass
class Row:
    section: str
    figure: str
    median: float
    low: float | None = None
    high: float | None = None
    unit: str = ""
    note: str = ""


# --------------------------------------------------------------------------- setup


def open_ports(nic: ModelNic, config: PortConfig = CONFIG) -> tuple[IxgbePort, IxgbePort]:
    """Bring up both ports of `nic`; the first does not wait for a link that needs the second."""
    a, b = nic.ports
    first = IxgbePort(a, replace(config, link_timeout=0))
    second = IxgbePort(b, config)
    for port in (first, second):
        if not port.wait_for_link(config.link_timeout):
            raise RuntimeError(f"{port.dev.address}: link did not come up")
    return first, second


def new_nic(mode: str) -> ModelNic:
    return ModelNic(2, mode=mode, reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)


def udp_frame(dst: bytes, src: bytes) -> bytes:
    """A 60-byte IPv4/UDP frame (checksums not needed: nothing on the path checks them)."""
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 46, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    )
    udp = struct.pack("!HHHH", 1000, 2000, 26, 0)
    frame = dst + src + b"\x08\x00" + ip + udp
    return frame + bytes(FRAME_SIZE - len(frame))


# Thread mode on two cores: the model's engine thread on one, the forwarder on the other.
MODEL_CPU, FORWARDER_CPU = 0, 1
PIN = len(os.sched_getaffinity(0)) >= 2 and {MODEL_CPU, FORWARDER_CPU} <= os.sched_getaffinity(0)


@contextlib.contextmanager
def pinned(cpu: int):
    """Run the block on `cpu` only: threads started inside inherit the affinity."""
    if not PIN:
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def new_thread_nic() -> ModelNic:
    with pinned(MODEL_CPU):  # the engine thread starts in ModelNic() and keeps this affinity
        return new_nic("thread")


class Forwarder:
    """ixyd_forward (the C loop) in a Python thread; cffi releases the GIL for the call."""

    def __init__(self, rx: RxQueue, tx: TxQueue, batch: int = 32):
        self.stats = ffi.new("struct ixyd_fwd_stats *")
        self._stop = ffi.new("uint32_t *")
        self._args = (rx.pointer, tx.pointer, batch, self._stop, self.stats)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if PIN:
            os.sched_setaffinity(0, {FORWARDER_CPU})  # pid 0: this thread only
        lib.ixyd_forward(*self._args)

    def __enter__(self) -> Forwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop[0] = 1
        self._thread.join()


def windows(read, count: int, seconds: float) -> list[float]:
    """Rate of the counter `read()` over `count` consecutive windows, per second."""
    rates = []
    for _ in range(count):
        c0, t0 = read(), time.perf_counter()
        time.sleep(seconds)
        c1, t1 = read(), time.perf_counter()
        rates.append((c1 - c0) / (t1 - t0))
    return rates


def rate_row(
    section: str, figure: str, rates: list[float], scale: float, unit: str, note: str = ""
) -> Row:
    scaled = [r / scale for r in rates]
    return Row(section, figure, statistics.median(scaled), min(scaled), max(scaled), unit, note)


# --------------------------------------------------------------------------- a. cable


def bench_cable(n_windows: int, seconds: float, seed: int = 256) -> list[Row]:
    """A transmits, the model carries A -> B, a C forwarder sends B's RX out of A again."""
    nic = new_thread_nic()
    try:
        nic.connect(*nic.ports)
        A, B = open_ports(nic)
        frames = allocate(A.rx_queues[0].pool, seed, udp_frame(B.mac, A.mac))
        with Forwarder(B.rx_queues[0], A.tx_queues[0]) as fwd:
            if transmit(A.tx_queues[0], frames) != seed:
                raise RuntimeError("the seed frames did not fit A's TX ring")
            time.sleep(seconds)  # warm up
            rates = windows(lambda: nic.ports[1].counters["rx_delivered"], n_windows, seconds)
        a, b = nic.ports[0].counters, nic.ports[1].counters
        lost = a["wire_dropped"] + b["rx_no_descriptor"] + b["rx_missed"] + fwd.stats.drop_tx_full
        note = f"{seed} frames circulating; {n_windows} x {seconds:g} s"
        rows = [rate_row("a", "model: frames through a cable A->B", rates, 1e6, "Mframes/s", note)]
        if nic.fault_count or lost:
            rows.append(Row("a", "!! IOMMU faults", nic.fault_count, note=f"{lost} frames lost"))
        for port in (A, B):
            port.shutdown()
        return rows
    finally:
        nic.close()


# --------------------------------------------------------------------------- b. callgrind


def callgrind_child(batch: int, packets: int, result_file: str) -> None:
    """Under valgrind: forward `packets` frames A -> B in step mode, `batch` per poll."""
    nic = new_nic("step")
    generator, checker = nic.attach_traffic(nic.ports[0]), nic.attach_traffic(nic.ports[1])
    A, B = open_ports(nic)
    generator.configure(size=FRAME_SIZE, rate=0, burst=batch)  # `batch` frames per step
    generator.pair(checker)
    generator.start()
    rx, tx = A.rx_queues[0].pointer, B.tx_queues[0].pointer
    # Warm up outside the toggled function (not counted): rings wrapped, TX clean-up running.
    bufs = ffi.new("struct ixyd_pkt *[]", max(batch, 1))
    for _ in range(2 * RING // batch + 2):
        nic.step()
        n = lib.ixyd_rx_batch(rx, bufs, batch)
        sent = lib.ixyd_tx_batch(tx, bufs, n)
        lib.ixyd_pkt_free_bulk(bufs + sent, n - sent)
    stats = ffi.new("struct ixyd_fwd_stats *")
    for _ in range(packets // batch):
        nic.step()
        lib.ixyd_forward_iterations(rx, tx, batch, 1, stats)
    nic.step()
    result = {
        name: getattr(stats, name)
        for name in ("packets", "iterations", "empty_polls", "drop_tx_full")
    }
    result["checker"] = checker.stats
    with open(result_file, "w") as f:
        json.dump(result, f)
    for port in (A, B):
        port.shutdown()
    nic.close()


def _function_costs(annotated: str) -> dict[str, int]:
    """Exclusive Ir per function from callgrind_annotate's listing."""
    costs: dict[str, int] = {}
    for line in annotated.splitlines():
        match = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?\S*?:?(\w+)\s*(?:\[|$)", line)
        if match:
            costs[match.group(2)] = costs.get(match.group(2), 0) + int(
                match.group(1).replace(",", "")
            )
    return costs


def run_callgrind(
    function: str, child_args: list[str], out: str, result: str, what: str
) -> tuple[dict, int]:
    """Run this script as a child (`child_args`) under callgrind, collecting inside
    `function` only; returns what the child wrote to `result` and the instructions counted
    (the totals line of the callgrind output `out`)."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--toggle-collect={function}",
        "--collect-atstart=no",
        f"--callgrind-out-file={out}",
        os.path.realpath(sys.executable),  # the interpreter binary, never a shim script
        os.path.abspath(__file__),
        *child_args,
        "--result-file",
        result,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"callgrind run ({what}) failed:\n{run.stderr[-3000:]}")
    with open(result) as f:
        forwarded = json.load(f)
    with open(out) as f:
        total = next(int(ln.split()[1]) for ln in f if ln.startswith(("totals:", "summary:")))
    return forwarded, total


def bench_callgrind(packets: int) -> list[Row]:
    """Run callgrind_child under valgrind for each batch size; instructions per packet."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_annotate")):
        return [
            Row(
                "b",
                "instructions/packet: skipped",
                0,
                note="valgrind not found; scripts/bootstrap installs it",
            )
        ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ixyd-callgrind-") as tmp:
        for batch in BATCH_SIZES:
            out, result = os.path.join(tmp, f"cg.{batch}"), os.path.join(tmp, f"result.{batch}")
            forwarded, total = run_callgrind(
                CALLGRIND_FUNCTION,
                ["--callgrind-child", str(batch), "--packets", str(packets)],
                out,
                result,
                f"batch {batch}",
            )
            annotate = subprocess.run(
                ["callgrind_annotate", "--threshold=100", out],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            costs = _function_costs(annotate)
            n = forwarded["packets"]
            split = {
                name: costs.get(f"ixyd_{name}", 0) / n
                for name in ("rx_batch", "tx_batch", "forward_iterations")
            }
            other = total / n - sum(split.values())
            note = (
                f"rx {split['rx_batch']:.1f} + tx {split['tx_batch']:.1f} + loop "
                f"{split['forward_iterations']:.1f} + other {other:.1f}; {n} pkts"
            )
            if (
                forwarded["drop_tx_full"]
                or forwarded["empty_polls"]
                or forwarded["checker"]["corrupt"]
            ):
                note += f" !! {forwarded}"
            rows.append(
                Row("b", f"instructions/packet, batch {batch}", total / n, unit="instr", note=note)
            )
    for name, value in ANCHORS.items():
        rows.append(
            Row("b", f"anchor: {name}", value, unit="instr", note="peers.md, perf counters")
        )
    return rows


# --------------------------------------------------------------------------- c. forwarding


def bench_forward(n_windows: int, seconds: float) -> list[Row]:
    """Generator at full rate -> A -> C forwarder -> B -> checker, model in thread mode."""
    nic = new_thread_nic()
    try:
        generator, checker = nic.attach_traffic(nic.ports[0]), nic.attach_traffic(nic.ports[1])
        A, B = open_ports(nic)
        generator.configure(size=FRAME_SIZE, flows=16, rate=0, burst=64)
        generator.pair(checker)
        with Forwarder(A.rx_queues[0], B.tx_queues[0]) as fwd:
            generator.start()
            time.sleep(seconds)  # warm up
            rates = windows(lambda: fwd.stats.packets, n_windows, seconds)
            generator.stop()
            _wait_until_stable(lambda: checker.stats["received"])
        sent, got = generator.stats, checker.stats
        no_desc = nic.ports[0].counters["rx_no_descriptor"]
        loss = 1 - got["unique"] / sent["sent"]
        rows = [
            rate_row(
                "c", "forwarded A->B, batch 32", rates, 1e6, "Mpps", f"{n_windows} x {seconds:g} s"
            ),
            Row(
                "c",
                "loss (generator -> checker)",
                100 * loss,
                unit="%",
                note=f"{sent['sent'] - got['unique']} of {sent['sent']}; "
                f"A rx_no_descriptor {no_desc}, forwarder drop_tx_full {fwd.stats.drop_tx_full}; "
                f"corrupt {got['corrupt']}, reordered {got['reordered']}, "
                f"IOMMU faults {nic.fault_count}",
            ),
        ]
        for port in (A, B):
            port.shutdown()
        return rows
    finally:
        nic.close()


def _wait_until_stable(read, interval: float = 0.05, timeout: float = 5.0) -> None:
    deadline, last = time.monotonic() + timeout, read()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = read()
        if now == last:
            return
        last = now


# --------------------------------------------------------------------------- d. Python API

RX_DD, RX_EOP, RX_RXE = 0x1, 0x2, 0x20000000  # RX write-back status (82599.md#rx-descriptors)
TX_CMD_DATA = 0x00300000 | 0x01000000 | 0x02000000 | 0x20000000  # DTYP_DATA | EOP | IFCS | DEXT
TX_CMD_RS, TX_DD, TX_PAYLEN_SHIFT = 0x08000000, 0x1, 14
TX_CLEAN_BATCH = 32
DESC = 16


class PurePythonPath:
    """RX on one ring and TX on another in pure Python, as ixy.py does: struct on descriptor
    memory, a Python list as the pool's free stack. It takes the rings and the pool over from
    the C queue state and hands them back in `release`, so both variants share the rings.
    Written with locals and no per-packet objects: a leaner loop than ixy.py itself."""

    def __init__(self, rxq: RxQueue, txq: TxQueue):
        self.rxq, self.txq, pool = rxq, txq, rxq.pool
        self.base, self.es = pool.base, pool.entry_size
        self.iova0 = pool.pointer.base_iova + PKT_HEADROOM  # IOVA of entry 0's data
        self.mem = memoryview(
            ffi.buffer(ffi.cast("uint8_t *", pool.base), pool.count * pool.entry_size)
        )
        r, t = rxq.pointer, txq.pointer
        self.rx_ring = self._bytes(r.ring, r.size * DESC)
        self.rdt = self._bytes(r.rdt, 4).cast("I")
        self.rx_slots = [
            self._entry(a) for a in ffi.unpack(ffi.cast("uintptr_t *", r.slots), r.size)
        ]
        self.rx_next, self.rx_mask = r.next, r.size - 1
        self.free = ffi.unpack(pool.pointer.free_stack, pool.pointer.free_top)
        self.tx_ring = self._bytes(t.ring, t.size * DESC)
        self.tdt = self._bytes(t.tdt, 4).cast("I")
        self.tx_tail, self.tx_clean, self.tx_mask = t.tail, t.clean, t.size - 1
        self.tx_slots = [0] * t.size
        for i in range(t.clean, t.clean + txq.in_flight):
            self.tx_slots[i & self.tx_mask] = self._entry(
                int(ffi.cast("uintptr_t", t.slots[i & self.tx_mask]))
            )

    @staticmethod
    def _bytes(pointer, size: int) -> memoryview:
        return memoryview(ffi.buffer(ffi.cast("uint8_t *", pointer), size))

    def _entry(self, address: int) -> int:
        k, rest = divmod(address - self.base, self.es)
        if rest or not 0 <= k < len(self.mem) // self.es:
            raise RuntimeError("a buffer of another pool is on the rings: cannot take them over")
        return k

    def forward(self, batch: int = 32) -> int:
        """Receive up to `batch` frames, add 1 to byte 1 of each, send them; returns the count."""
        ring, slots, free, mem, es, iova0 = (
            self.rx_ring,
            self.rx_slots,
            self.free,
            self.mem,
            self.es,
            self.iova0,
        )
        unpack_from, pack_into = struct.unpack_from, struct.pack_into
        i, mask, got = self.rx_next, self.rx_mask, []
        for _ in range(batch):
            status, length = unpack_from("<IH", ring, i * DESC + 8)
            if not status & RX_DD:
                break
            if status & (RX_EOP | RX_RXE) != RX_EOP:  # drop: the buffer goes back to its descriptor
                pack_into("<QQ", ring, i * DESC, iova0 + slots[i] * es, 0)
            else:
                got.append((slots[i], length))
                fresh = slots[i] = free.pop()
                pack_into("<QQ", ring, i * DESC, iova0 + fresh * es, 0)
            i = (i + 1) & mask
        if i != self.rx_next:
            self.rx_next = i
            self.rdt[0] = (i - 1) & mask  # stay one behind: RDT == RDH means "ring full"
        for k, _ in got:  # touch one byte, like ixy-fwd
            mem[k * es + PKT_HEADROOM + 1] = (mem[k * es + PKT_HEADROOM + 1] + 1) & 0xFF
        # TX: reclaim groups of 32 whose last descriptor (RS) has DD, then fill descriptors
        ring, slots, tail, clean, mask = (
            self.tx_ring,
            self.tx_slots,
            self.tx_tail,
            self.tx_clean,
            self.tx_mask,
        )
        while (tail - clean) & mask >= TX_CLEAN_BATCH and unpack_from(
            "<I", ring, (clean + TX_CLEAN_BATCH - 1) * DESC + 12
        )[0] & TX_DD:
            free.extend(slots[clean : clean + TX_CLEAN_BATCH])
            clean = (clean + TX_CLEAN_BATCH) & mask
        room = (clean - tail - 1) & mask
        for k, length in got[:room]:
            cmd = TX_CMD_DATA | length | (TX_CMD_RS if tail & 31 == 31 else 0)
            pack_into("<QII", ring, tail * DESC, iova0 + k * es, cmd, length << TX_PAYLEN_SHIFT)
            slots[tail] = k
            tail = (tail + 1) & mask
        free.extend(k for k, _ in got[room:])
        if got:
            self.tdt[0] = tail
        self.tx_tail, self.tx_clean = tail, clean
        return len(got)

    def release(self) -> None:
        """Write ring positions, slots and the free stack back into the C structs."""
        r, t, pool = self.rxq.pointer, self.txq.pointer, self.rxq.pool.pointer
        address = lambda k: ffi.cast("struct ixyd_pkt *", self.base + k * self.es)  # noqa: E731
        r.next = self.rx_next
        for i, k in enumerate(self.rx_slots):
            r.slots[i] = address(k)
        t.tail, t.clean = self.tx_tail, self.tx_clean
        for i in range(
            self.tx_clean, self.tx_clean + ((self.tx_tail - self.tx_clean) & self.tx_mask)
        ):
            t.slots[i & self.tx_mask] = address(self.tx_slots[i & self.tx_mask])
        for i, k in enumerate(self.free):
            pool.free_stack[i] = k
        pool.free_top = len(self.free)


def bench_python(repeats: int, packets: int, burst: int = 256) -> list[Row]:
    """Receive, touch one byte, transmit, A -> B: ixyd.packets vs PurePythonPath, alternating."""
    nic = new_nic("step")
    try:
        generator, checker = nic.attach_traffic(nic.ports[0]), nic.attach_traffic(nic.ports[1])
        A, B = open_ports(nic)
        generator.configure(size=FRAME_SIZE, flows=4, rate=0, burst=burst)
        generator.pair(checker)
        generator.start()
        rxq, txq = A.rx_queues[0], B.tx_queues[0]

        def packet_api() -> int:
            batch = receive(rxq)
            n = len(batch)
            for frame in batch:
                frame[1] = (frame[1] + 1) & 0xFF
            transmit(txq, batch)  # empties the batch
            return n

        def run(forward, count: int = packets) -> float:
            done, busy = 0, 0.0
            while done < count:
                nic.step(budget=RING)  # the model is not timed
                t0 = time.perf_counter()
                while n := forward():
                    done += n
                busy += time.perf_counter() - t0
            return done / busy

        run(packet_api, 4 * RING)  # warm-up: builds the pool's views, fills the caches
        api_rates, pure_rates = [], []
        for _ in range(repeats):
            api_rates.append(run(packet_api))
            pure = PurePythonPath(rxq, txq)
            pure_rates.append(run(pure.forward))
            pure.release()
        nic.step(budget=RING)
        got, sent = checker.stats, generator.stats["sent"]
        # the generator's last burst is still in A's RX ring: nothing else may be missing
        ok = got["corrupt"] == got["duplicates"] == got["reordered"] == 0 == nic.fault_count
        ok = ok and sent - got["unique"] == burst
        check = f"checker: {'clean' if ok else f'!! {got}'}, {got['unique']} of {sent} frames"
        ratios = [a / p for a, p in zip(api_rates, pure_rates, strict=True)]
        rows = [
            rate_row(
                "d",
                "ixyd.packets: receive+touch+transmit",
                api_rates,
                1e6,
                "Mpps",
                "batch 32, Python side only",
            ),
            rate_row("d", "pure Python (ixy.py-like struct loop)", pure_rates, 1e6, "Mpps", check),
            Row(
                "d",
                "ratio packets API / pure Python",
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                "x",
                f"{repeats} alternating runs of {packets} packets",
            ),
        ]
        for port in (A, B):
            port.shutdown()
        return rows
    finally:
        nic.close()


# --------------------------------------------------------------------------- e. capture

CAPTURE_CALLGRIND_FUNCTION = "ixyd_worker_iterations"
CAPTURE_BATCH = 32
CAPTURE_FRAME_SIZES = (FRAME_SIZE, 1514)  # the smallest and the largest frame, no FCS
CAPTURE_KEEP_UP_RATE = 200_000  # frames/s offered in the run the capture must keep up with


def capture_worker(nic: ModelNic, A: IxgbePort, B: IxgbePort, cpu: int | None = None):
    """A Worker forwarding A's RX queue to B's TX queue, and its capture source."""
    table = ForwardingTable()
    rxq = A.rx_queues[0]
    worker = Worker(table, [rxq], [B.tx_queues[0]], batch=CAPTURE_BATCH, cpu=cpu)
    table.set(rxq, "port", tx=B.tx_queues[0])
    return worker, CaptureSource(worker, rxq)


def capture_callgrind_child(armed: bool, size: int, packets: int, result_file: str) -> None:
    """Under valgrind: the worker loop (ixyd_worker_iterations, one round per call) forwards
    A -> B in step mode, 32 frames per round, with a capture armed or not. The ring is
    drained between calls, outside the counted function."""
    nic = new_nic("step")
    generator, checker = nic.attach_traffic(nic.ports[0]), nic.attach_traffic(nic.ports[1])
    A, B = open_ports(nic)
    generator.configure(size=size, rate=0, burst=CAPTURE_BATCH)
    generator.pair(checker)
    generator.start()
    worker, source = capture_worker(nic, A, B)
    session = source.ring.begin(MAX_SNAPLEN)
    if armed:
        source.arm()
    stats = ffi.new("struct ixyd_fwd_stats *")
    for _ in range(2 * RING // CAPTURE_BATCH + 2):  # warm-up, not counted: rings wrapped
        nic.step()
        lib.ixyd_forward_iterations(A.rx_queues[0].pointer, B.tx_queues[0].pointer, 32, 1, stats)
    before = worker.queue_stats(A.rx_queues[0])["sent"]
    captured = 0
    for _ in range(packets // CAPTURE_BATCH):
        nic.step()
        lib.ixyd_worker_iterations(worker.pointer, 1)
        while got := source.ring.drain(session, 1 << 20)[1]:
            captured += got
    nic.step()
    result = {
        "packets": worker.queue_stats(A.rx_queues[0])["sent"] - before,
        "captured": captured,
        "ring": source.ring.stats,
        "checker": checker.stats,
    }
    with open(result_file, "w") as f:
        json.dump(result, f)
    worker.close()
    for port in (A, B):
        port.shutdown()
    nic.close()


def capture_instructions(packets: int) -> list[Row]:
    """Instructions per forwarded packet of the worker loop, capture off and armed."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_annotate")):
        return [Row("e", "instructions/packet: skipped", 0, note="valgrind not found")]
    rows, per_packet = [], {}
    runs = [(size, armed) for size in CAPTURE_FRAME_SIZES for armed in (False, True)]
    with tempfile.TemporaryDirectory(prefix="ixyd-callgrind-") as tmp:
        for size, armed in runs:
            out = os.path.join(tmp, f"cg.{size}.{armed}")
            result = os.path.join(tmp, f"res.{size}.{armed}")
            forwarded, total = run_callgrind(
                CAPTURE_CALLGRIND_FUNCTION,
                ["--capture-child", "armed" if armed else "off", "--frame-size", str(size)]
                + ["--packets", str(packets)],
                out,
                result,
                f"capture {armed}",
            )
            n = forwarded["packets"]
            per_packet[size, armed] = total / n
            note = f"batch {CAPTURE_BATCH}, {n} pkts"
            if armed:
                note += f", {forwarded['captured']} captured, ring {forwarded['ring']}"
            if forwarded["checker"]["corrupt"] or (armed and forwarded["captured"] != n):
                note += f" !! {forwarded}"
            label = "capture armed" if armed else "no capture"
            figure = f"worker loop instr/packet, {size} B, {label}"
            rows.append(Row("e", figure, total / n, unit="instr", note=note))
    for size in CAPTURE_FRAME_SIZES:
        rows.append(
            Row(
                "e",
                f"capture cost per copied {size}-byte frame",
                per_packet[size, True] - per_packet[size, False],
                unit="instr",
                note="slot header + copy; one clock read per batch",
            )
        )
    return rows


def bench_capture(n_windows: int, seconds: float) -> list[Row]:
    """Generator at full rate -> A -> Worker -> B -> checker (thread mode); windows with a
    capture session running (its drain thread encodes pcap and discards it) alternate with
    windows without one."""
    nic = new_thread_nic()
    worker = None
    try:
        generator, checker = nic.attach_traffic(nic.ports[0]), nic.attach_traffic(nic.ports[1])
        A, B = open_ports(nic)
        generator.configure(size=FRAME_SIZE, flows=16, rate=0, burst=64)
        generator.pair(checker)
        worker, source = capture_worker(nic, A, B, FORWARDER_CPU if PIN else None)
        worker.start()
        generator.start()
        time.sleep(seconds)  # warm up

        def sent() -> int:
            return worker.queue_stats(A.rx_queues[0])["sent"]

        off, on, ratios, copied, dropped = [], [], [], 0, 0
        for _ in range(n_windows):
            off.append(windows(sent, 1, seconds)[0])
            session = CaptureSession([source], lambda event, params: True)
            session.start()
            on.append(windows(sent, 1, seconds)[0])
            session.stop()
            session.join(5)
            copied += session.frames
            dropped += session.dropped
            if off[-1]:  # a window in which the worker never ran (a busy machine) has none
                ratios.append(on[-1] / off[-1])
        # a rate the capture keeps up with: every frame copied, none dropped
        generator.stop()
        generator.configure(size=FRAME_SIZE, flows=16, rate=CAPTURE_KEEP_UP_RATE, burst=64)
        generator.start()
        time.sleep(seconds / 2)
        session = CaptureSession([source], lambda event, params: True)
        received = worker.queue_stats(A.rx_queues[0])["packets"]
        started = time.perf_counter()
        session.start()
        time.sleep(2 * seconds)
        session.stop()
        session.join(5)
        kept_up = session.frames / (time.perf_counter() - started)
        received = worker.queue_stats(A.rx_queues[0])["packets"] - received
        generator.stop()
        _wait_until_stable(lambda: checker.stats["received"])
        got = checker.stats
        rows = [
            rate_row(
                "e", "forwarded, no capture", off, 1e6, "Mpps", f"{n_windows} x {seconds:g} s"
            ),
            rate_row(
                "e",
                "forwarded, capture running",
                on,
                1e6,
                "Mpps",
                f"copies written {copied:,}, dropped (ring full) {dropped:,}",
            ),
            Row(
                "e",
                "ratio capture / no capture",
                statistics.median(ratios or [0]),
                min(ratios or [0]),
                max(ratios or [0]),
                "x",
                f"alternating windows; checker: corrupt {got['corrupt']}, "
                f"reordered {got['reordered']}, duplicates {got['duplicates']}",
            ),
            Row(
                "e",
                f"capture at {CAPTURE_KEEP_UP_RATE / 1e3:g} kframes/s offered",
                kept_up / 1e3,
                unit="kframes/s",
                note=f"frames written per s over {2 * seconds:g} s: {session.frames:,} of "
                f"{received:,} received; dropped (ring full) {session.dropped:,}",
            ),
        ]
        worker.close()
        worker = None
        for port in (A, B):
            port.shutdown()
        return rows
    finally:
        if worker is not None:
            worker.close()
        nic.close()


# --------------------------------------------------------------------------- report


def machine() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return [
        f"date:    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {model}",
        f"kernel:  {platform.system()} {platform.release()}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (other busy processes distort every figure but b)",
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"({os.path.realpath(sys.executable)})",
    ]


_SPIN = """import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
end, n = time.perf_counter() + float(sys.argv[2]), 0
while time.perf_counter() < end:
    n += 1
print(n)"""


def cpu_overlap(seconds: float = 0.5) -> str:
    """How much two busy processes on CPUs 0 and 1 slow each other down.

    On two independent cores each keeps ~100% of its speed alone; vCPUs that the host
    time-slices on one core (or SMT siblings) give ~50%. Thread-mode figures depend on it.
    """
    if not PIN:
        return "not measured (fewer than 2 usable CPUs or --no-pin)"

    def spin(cpu: int) -> subprocess.Popen:
        cmd = [sys.executable, "-c", _SPIN, str(cpu), str(seconds)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    alone = [int(spin(cpu).communicate()[0]) for cpu in (MODEL_CPU, FORWARDER_CPU)]
    both = [spin(MODEL_CPU), spin(FORWARDER_CPU)]
    together = [int(p.communicate()[0]) for p in both]
    shares = [t / a for t, a in zip(together, alone, strict=True)]
    return (
        f"two busy processes on CPUs {MODEL_CPU} and {FORWARDER_CPU} each run at "
        f"{100 * min(shares):.0f}-{100 * max(shares):.0f}% of their speed alone"
    )


def print_table(rows: list[Row]) -> None:
    def number(x: float | None) -> str:
        if x is None:
            return ""
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"

    table = [("", "figure", "median", "min..max", "unit", "notes")]
    for r in rows:
        spread = f"{number(r.low)}..{number(r.high)}" if r.low is not None else ""
        table.append((r.section, r.figure, number(r.median), spread, r.unit, r.note))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for k, row in enumerate(table):
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].ljust(widths[3]),
            row[4].ljust(widths[4]),
            row[5],
        ]
        print("  ".join(cells).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths) + "  -----")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows and packets")
    parser.add_argument("--sections", default="abcde", help="which sections to run (default abcde)")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave thread placement to the scheduler"
    )
    parser.add_argument("--callgrind-child", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    parser.add_argument("--capture-child", choices=("off", "armed"), help=argparse.SUPPRESS)
    parser.add_argument("--frame-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--packets", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_child:
        callgrind_child(args.callgrind_child, args.packets, args.result_file)
        return
    if args.capture_child:
        capture_callgrind_child(
            args.capture_child == "armed", args.frame_size, args.packets, args.result_file
        )
        return
    if args.no_pin:
        global PIN
        PIN = False
    n_windows, seconds = (3, 0.3) if args.quick else (7, 1.0)
    for line in machine():
        print(line)
    placement = (
        f"model engine thread pinned to CPU {MODEL_CPU}, forwarder to CPU {FORWARDER_CPU}"
        if PIN
        else "model engine thread and forwarder not pinned"
    )
    print(f"mode:    {'quick' if args.quick else 'full'}; thread mode (a, c): {placement}")
    print(f"cores:   {cpu_overlap()}\n", flush=True)
    rows: list[Row] = []
    started = time.monotonic()
    if "a" in args.sections:
        rows += bench_cable(n_windows, seconds)
    if "b" in args.sections:
        rows += bench_callgrind(1024 if args.quick else 4096)
    if "c" in args.sections:
        rows += bench_forward(n_windows, seconds)
    if "d" in args.sections:
        rows += bench_python(3 if args.quick else 7, 20_000 if args.quick else 100_000)
    if "e" in args.sections:
        rows += capture_instructions(1024 if args.quick else 4096)
        rows += bench_capture(n_windows, seconds)
    print_table(rows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n({time.monotonic() - started:.0f} s; load average now {load})")


if __name__ == "__main__":
    main()
