#!/usr/bin/env python3
"""What Prometheus scraping costs the data path: an ixyd instance's forwarding rate while a
real Prometheus server scrapes it at 10 Hz, against the same instance unscraped.

    .venv/bin/python benchmarks/scrape_overhead.py              # 4 x 9 pairs of 2 s windows
    .venv/bin/python benchmarks/scrape_overhead.py --pairs 5 --seconds 1

The instance is the daemon's own `Instance` (service.py) with one 82599 model port: the
model's generator sends 64-byte frames into it as fast as the model runs, the port's
worker reflects them back out (forward = reflect), the model's checker takes them off the
wire. The worker is pinned to CPU 1 and the model's engine thread to CPU 0. Two placements
of the scrape work (the metrics HTTP thread and Prometheus): "shared", wherever the
scheduler puts it, so it takes CPU time from the worker or the engine, as on a host with
no spare core; and "housekeeping", pinned to CPU 0, so the worker's core is its own, as on
a host that isolates its poll cores (the engine, standing in for the NIC, then shares
CPU 0 with the scrapes: a real NIC would not).

One Prometheus process (Debian's, scrape_interval 100 ms, on 127.0.0.1) is started once;
between windows it is paused (SIGSTOP: no scrapes, no CPU) or resumed (SIGCONT), in
alternating order, so both variants share the same run and the same machine state. The
forwarding rate of a window is the worker's `sent` counter (a shared-memory read that the
worker never notices) divided by the window's length. A second run of windows stops the
generator and counts the idle worker's poll-loop rounds instead: the CPU time the worker
thread gets, without the model's own ups and downs. Needs the `prometheus` package.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from prometheus_client import generate_latest  # noqa: E402

from ixyd.config import build  # noqa: E402
from ixyd.metrics import IxydCollector  # noqa: E402
from ixyd.service import Instance  # noqa: E402

ENGINE_CPU, WORKER_CPU = 0, 1
SCRAPE_INTERVAL_MS = 100  # 10 Hz
SETTLE = 0.3  # seconds after pausing/resuming Prometheus before a window starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_instance(workdir: str, rate: int = 0) -> Instance:
    config = build(
        {
            "instance": "bench",
            "state_dir": workdir,
            "control_socket": os.path.join(workdir, "ctl.sock"),
            "metrics": "127.0.0.1:0",
            "model_traffic": {"rate": rate, "frames": 0},
            "port": [
                {
                    "address": "bench.0",
                    "backend": "model",
                    "cpus": [WORKER_CPU],
                    "forward": {"mode": "reflect"},
                }
            ],
        },
        None,
    )
    instance = Instance(config, run_dir=workdir)
    instance.start()
    engine = next(t for t in threading.enumerate() if t.name == "bench-engine")
    os.sched_setaffinity(engine.native_id, {ENGINE_CPU})
    return instance


def start_prometheus(workdir: str, target: str) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{free_port()}"
    config = os.path.join(workdir, "prometheus.yml")
    with open(config, "w") as f:
        f.write(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL_MS}ms\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_MS}ms\n"
            f"scrape_configs:\n  - job_name: ixyd\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
    proc = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
            f"--web.listen-address={url.removeprefix('http://')}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    query = urllib.parse.urlencode({"query": "up"})
    while True:  # wait for the first scrape (about 6 s: Prometheus' discovery tick)
        try:
            with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=2) as reply:
                if json.loads(reply.read())["data"]["result"]:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("prometheus did not start or never scraped ixyd")
        time.sleep(0.2)


def place(metrics_thread: threading.Thread, prometheus: subprocess.Popen, cpus: set[int]) -> None:
    """Pin the metrics HTTP thread (its per-request threads inherit the mask) and every
    thread of Prometheus to `cpus`."""
    os.sched_setaffinity(metrics_thread.native_id, cpus)
    for task in os.listdir(f"/proc/{prometheus.pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a Go runtime thread that just ended


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (proc(5) stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exposition_cpu_ms(instance: Instance, rounds: int = 50) -> float:
    """CPU time of one whole answer (collect + the process collector + text format)."""
    registry = instance.metrics.registry
    started = time.thread_time()
    for _ in range(rounds):
        generate_latest(registry)
    return 1000 * (time.thread_time() - started) / rounds


def measure(
    counter: Callable[[], int],
    collector: IxydCollector,
    prometheus: subprocess.Popen,
    pairs: int,
    seconds: float,
) -> Comparison:
    """The rate of `counter` in alternating windows with Prometheus paused and running."""
    out = Comparison()
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        pair = {}
        for scraped in order:
            prometheus.send_signal(signal.SIGCONT if scraped else signal.SIGSTOP)
            time.sleep(SETTLE)
            snap0 = (counter(), collector.scrapes, cpu_seconds(prometheus.pid), time.monotonic())
            time.sleep(seconds)
            snap1 = (counter(), collector.scrapes, cpu_seconds(prometheus.pid), time.monotonic())
            (count, scrapes, cpu, dt) = (b - a for a, b in zip(snap0, snap1, strict=True))
            pair[scraped] = count / dt
            (out.scraped if scraped else out.unscraped).append(count / dt)
            if scraped:
                out.scrape_rates.append(scrapes / dt)
                out.prometheus_cpu.append(cpu / dt)
            else:
                assert scrapes == 0, "Prometheus scraped while paused"
        if pair[False] > 0:  # nothing at all in a window: the thread got no CPU
            out.differences.append(100 * (pair[True] / pair[False] - 1))
    prometheus.send_signal(signal.SIGCONT)
    return out


@dataclass
class Comparison:
    """Rates per window, unscraped and scraped, and per pair the difference in %."""

    unscraped: list[float] = field(default_factory=list)
    scraped: list[float] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)
    scrape_rates: list[float] = field(default_factory=list)
    prometheus_cpu: list[float] = field(default_factory=list)

    def print(self, what: str, unit: str, scale: float, pairs: int) -> None:
        left_out = pairs - len(self.differences)
        note = f"; {left_out} pairs left out: a window was empty" if left_out else ""
        print(f"{what}, unscraped".ljust(42) + f"{spread(self.unscraped, scale)} {unit}")
        print(f"{what}, scraped at 10 Hz".ljust(42) + f"{spread(self.scraped, scale)} {unit}")
        print("difference per pair".ljust(42) + f"{spread(self.differences)} %{note}")


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return (
        f"{statistics.median(values) / scale:.{digits}f} "
        f"({min(values) / scale:.{digits}f}..{max(values) / scale:.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=9, help="window pairs (default 9)")
    parser.add_argument("--seconds", type=float, default=2.0, help="window length (default 2)")
    parser.add_argument(
        "--rate", type=int, default=0, help="offered frames/s (default 0: the model's maximum)"
    )
    args = parser.parse_args()
    if not shutil.which("prometheus"):
        sys.exit("needs Debian's prometheus package (scripts/bootstrap installs it)")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="ixyd-scrape-bench-")
    instance = start_instance(workdir, args.rate)
    prometheus = None
    try:
        prometheus, _ = start_prometheus(workdir, instance.metrics.address)
        worker, rxq, _ = instance.ports[0].workers[0]
        collector = instance.metrics.collector
        metrics_thread = next(t for t in threading.enumerate() if t.name == "ixyd-metrics")
        everywhere = set(range(os.cpu_count() or 1))
        placements = {
            "shared": everywhere,  # the scheduler puts scrapes on either busy core
            "housekeeping": {ENGINE_CPU},  # the worker's core is left to the worker
        }
        forwarding, spinning = {}, {}
        for name, cpus in placements.items():
            place(metrics_thread, prometheus, cpus)
            forwarding[name] = measure(
                lambda: worker.queue_stats(rxq)["sent"],
                collector,
                prometheus,
                args.pairs,
                args.seconds,
            )
        instance.ports[0].traffic.stop()  # an idle port: the worker only spins
        time.sleep(SETTLE)
        for name, cpus in placements.items():
            place(metrics_thread, prometheus, cpus)
            spinning[name] = measure(
                lambda: worker.stats["iterations"], collector, prometheus, args.pairs, args.seconds
            )
        answer_cpu_ms = exposition_cpu_ms(instance)
        scrapes = max(collector.scrapes, 1)
        per_scrape_ms = 1000 * collector.scrape_seconds / scrapes
        per_scrape_cpu_ms = 1000 * collector.scrape_cpu_seconds / scrapes
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        offered = f"{args.rate:,} frames/s" if args.rate else "the model's full rate"
        print(f"date:    {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; load average {load}")
        print(f"python:  {platform.python_implementation()} {platform.python_version()}")
        print(
            f"setup:   one model port, reflect, 64-byte frames offered at {offered}; "
            f"engine on CPU {ENGINE_CPU}, worker on CPU {WORKER_CPU}; "
            f"{args.pairs} pairs of {args.seconds:g} s windows, alternating"
        )
        for name in placements:
            where = (
                "metrics thread and Prometheus anywhere"
                if name == "shared"
                else f"metrics thread and Prometheus on CPU {ENGINE_CPU} only"
            )
            print(f"\n{name}: {where}")
            forwarding[name].print("forwarded", "Mpps", 1e6, args.pairs)
            spinning[name].print("poll rounds, idle port", "M/s", 1e6, args.pairs)
        print()
        every = [*forwarding.values(), *spinning.values()]
        rates = [r for c in every for r in c.scrape_rates]
        print("scrapes served".ljust(42) + f"{spread(rates, 1, 1)} per second")
        print(
            "collector per scrape".ljust(42) + f"{per_scrape_cpu_ms:.2f} ms CPU, "
            f"{per_scrape_ms:.2f} ms wall clock (mean of {collector.scrapes})"
        )
        print(
            "whole answer per scrape".ljust(42) + f"{answer_cpu_ms:.2f} ms CPU (collect + format)"
        )
        prom_cpu = spread([100 * u for c in every for u in c.prometheus_cpu], 1, 0)
        print("Prometheus while scraping".ljust(42) + f"{prom_cpu} % of a CPU")
        print(f"\nrun took {time.monotonic() - started:.0f} s")
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGCONT)
            prometheus.terminate()
            prometheus.wait(10)
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
