#!/usr/bin/env python3
"""How fast the TAP bridge takes frames from a kernel sender, against how fast the worker
forwards: does the bridge keep up with a kernel sender at the rate the worker can
forward? Needs root and /dev/net/tun; makes its own network namespace.

    .venv/bin/python benchmarks/tap_bridge.py              # about 30 s
    .venv/bin/python benchmarks/tap_bridge.py --seconds 1 --windows 3

Two model ports joined by a cable (thread mode). Figures, each the median (min..max) of
`--windows` windows:
  1. worker: frames/s the worker (ixyd.worker.Worker, batch 32) forwards A -> B, the
     model's generator feeding A at full rate: what the data path can carry.
  2. kernel sender: frames/s a sender in the TAP's namespace hands the TAP (AF_PACKET,
     straight to the driver, `--senders` processes), and of those
  3. bridge: frames/s the TapBridge reads from the TAP and the worker sends out of A
     (tap mode), the bridge thread's CPU share and its frames per CPU-second (what it
     would carry on a core of its own: the figure that does not depend on the load) and
     the part of its CPU time spent in the kernel (its read/write/poll syscalls), and
  4. kernel queue drops: frames/s the kernel dropped at the TAP's full queue (its
     tx_dropped): the part of the offer the bridge did not take.
Then the accounting check of the whole run: sent = sent out of A + every drop reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from ixyd.drivers.config import PortConfig  # noqa: E402
from ixyd.drivers.ixgbe import IxgbePort  # noqa: E402
from ixyd.model import ModelNic  # noqa: E402
from ixyd.tap import TapBridge, TapInterface  # noqa: E402
from ixyd.worker import ForwardingTable, Worker  # noqa: E402

from bench import open_ports, windows  # noqa: E402  (benchmarks/bench.py, beside this)

FRAME_SIZE = 60  # bytes without FCS: the smallest frame, the most frames per second
CONFIG = PortConfig(rx_ring=512, tx_ring=512, link_timeout=2.0)

SENDER = """
    import socket, sys, time
    ifname, seconds = sys.argv[1], float(sys.argv[2])
    SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20  # <linux/socket.h>, <linux/if_packet.h>
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    s.bind((ifname, 0))
    frame = bytes.fromhex("020000000002" "020000000001" "88b5").ljust({size}, b"\\0")
    print("ready", flush=True)
    sys.stdin.readline()  # go
    sent = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(256):
            try:
                s.send(frame)
            except OSError:
                refused += 1
        sent += 256
    print(sent, refused, flush=True)
"""


def thread_cpu_seconds(thread) -> tuple[float, float]:
    """CPU time `thread` of this process has used in all, from its CPU-time clock
    (nanoseconds: a thread at a few % of a CPU runs only a few of proc's 10 ms ticks per
    window), and the system part of it (proc(5) stat: stime, in ticks)."""
    total = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return total, int(fields[12]) / os.sysconf("SC_CLK_TCK")


def median_row(name: str, rates: list[float], unit: str = "kframes/s") -> str:
    k = [r / 1e3 for r in rates]
    return f"  {name:<44} {statistics.median(k):9.1f}  ({min(k):.1f}..{max(k):.1f}) {unit}"


def bench_worker(n: int, seconds: float) -> list[float]:
    """The worker forwarding A -> B, fed by the model's generator at full rate. (Its CPU
    time says nothing: it busy-polls whether frames come or not.)"""
    nic = ModelNic(2, mode="thread", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)
    try:
        generator = nic.attach_traffic(nic.ports[0])
        nic.attach_traffic(nic.ports[1])
        a, b = open_ports(nic, CONFIG)
        table = ForwardingTable()
        worker = Worker(table, [a.rx_queues[0]], [b.tx_queues[0]])
        table.set(a.rx_queues[0], "port", tx=b.tx_queues[0])

        def sent() -> int:
            return worker.queue_stats(a.rx_queues[0])["sent"]

        generator.configure(size=FRAME_SIZE, flows=16, rate=0, burst=64)
        worker.start()
        try:
            generator.start()
            time.sleep(seconds)  # warm up
            rates = windows(sent, n, seconds)
            generator.stop()
        finally:
            worker.close()
        for port in (a, b):
            port.shutdown()
        return rates
    finally:
        nic.close()


def bench_bridge(n: int, seconds: float, senders: int) -> dict:
    """Kernel senders in the TAP's namespace -> TAP -> bridge -> worker -> A -> cable -> B."""
    netns = f"ixt-tap-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    for scope in ("all", "default"):  # no IPv6 chatter from the kernel on the TAP
        sysctl = f"net.ipv6.conf.{scope}.disable_ipv6=1"
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", sysctl], check=True)
    nic = ModelNic(2, mode="thread", reset_delay=0.0005, eeprom_delay=0.0005, link_delay=0.002)
    procs: list[subprocess.Popen] = []
    try:
        nic.connect(*nic.ports)
        a, b = open_ports(nic, CONFIG)
        rxq, txq = a.rx_queues[0], a.tx_queues[0]
        table = ForwardingTable()
        worker = Worker(table, [rxq], [txq], exception_queues=[rxq])
        table.set(rxq, "exception", tx=txq)
        tap = TapInterface.create(f"ixt-tapb{uuid.uuid4().hex[:4]}", netns=netns)
        bridge = TapBridge(worker.exception(rxq), tap)
        worker.start()
        bridge.start()
        script = textwrap.dedent(SENDER).replace("{size}", str(FRAME_SIZE))
        total = seconds * (n + 1) + 1  # one warm-up window, then n measured
        for _ in range(senders):
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", netns, sys.executable, "-c", script]
                    + [tap.name, str(total)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        time.sleep(seconds)  # warm up

        def counters() -> tuple[float, ...]:
            return (
                bridge.stats["from_kernel"],
                worker.queue_stats(rxq)["from_host"],
                tap.kernel_drops(),
                *thread_cpu_seconds(bridge._thread),
            )

        samples = []
        for _ in range(n):
            c0, t0 = counters(), time.perf_counter()
            time.sleep(seconds)
            c1, t1 = counters(), time.perf_counter()
            samples.append([(y - x) / (t1 - t0) for x, y in zip(c0, c1, strict=True)])
        sent = refused = 0
        for p in procs:
            out, _ = p.communicate(timeout=total + 60)
            s, r = (int(v) for v in out.split())
            sent, refused = sent + s, refused + r
        deadline = time.monotonic() + 10  # let what is in flight drain
        while time.monotonic() < deadline:
            before = counters()
            time.sleep(0.2)
            if counters() == before:
                break
        bridge.stop()
        q, s = worker.queue_stats(rxq), bridge.stats
        accounted = (
            q["from_host"]
            + q["drop_from_host"]
            + s["drop_oversize"]
            + s["drop_stopped"]
            + tap.kernel_drops()
        )
        worker.close()
        tap.close()
        for port in (a, b):
            port.shutdown()
        return {
            "bridge": [x[0] for x in samples],
            "sent_out": [x[1] for x in samples],
            "kernel_drops": [x[2] for x in samples],
            "bridge_cpu": [x[3] for x in samples],  # CPU-seconds per second
            "bridge_system": [x[4] / x[3] for x in samples if x[3] > 0],  # in the kernel
            "per_cpu_second": [x[0] / x[3] for x in samples if x[3] > 0],
            "offered": [x[0] + x[2] for x in samples],
            "sent": sent,
            "refused": refused,
            "accounted": accounted,
            "kernel_drops_total": tap.kernel_drops(),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        nic.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--senders", type=int, default=2, help="kernel sender processes")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        sys.exit("needs root and /dev/net/tun")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {FRAME_SIZE}-byte "
          f"frames; {args.windows} windows of {args.seconds:g} s")
    worker = bench_worker(args.windows, args.seconds)
    print(median_row("1. worker forwarding A->B (generator-fed)", worker))
    bridge = bench_bridge(args.windows, args.seconds, args.senders)
    print(median_row(f"2. kernel offered to the TAP ({args.senders} senders)", bridge["offered"]))
    print(median_row("3. bridge: read from the TAP", bridge["bridge"]))
    print(median_row("   worker: sent out of A (from_host)", bridge["sent_out"]))
    print(median_row("4. kernel dropped at the TAP's full queue", bridge["kernel_drops"]))
    share = statistics.median(bridge["bridge_cpu"])
    print(f"  {'   bridge thread: CPU share':<44} {share:9.2f}  (of one CPU)")
    print(median_row("   bridge: frames per CPU-second it ran", bridge["per_cpu_second"]))
    system = statistics.median(bridge["bridge_system"])
    print(f"  {'   of its CPU time, in the kernel (syscalls)':<44} {system:9.2f}")
    ratio = statistics.median(bridge["bridge"]) / statistics.median(worker)
    per_cpu = statistics.median(bridge["per_cpu_second"]) / statistics.median(worker)
    print(
        f"  bridge / worker forwarding rate: {ratio:.3f} as measured; the bridge's frames per "
        f"CPU-second / the worker's rate: {per_cpu:.3f}"
    )
    ok = bridge["accounted"] == bridge["sent"]
    print(
        f"  accounting: sent {bridge['sent']} = sent out + drops {bridge['accounted']}: "
        f"{'exact' if ok else 'MISMATCH'} (kernel queue drops {bridge['kernel_drops_total']}, "
        f"the senders saw {bridge['refused']} refused)"
    )


if __name__ == "__main__":
    main()
