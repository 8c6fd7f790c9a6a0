#!/usr/bin/env python3
"""What a flood of slow clients on the metrics port does to a running ixyd.

    sudo .venv/bin/python benchmarks/metrics_flood.py                 # 2,000 clients, 30 s
    sudo .venv/bin/python benchmarks/metrics_flood.py --clients 500 --seconds 10

Starts `ixyd --demo` as systemd would without LimitNOFILE= (soft limit 1024 open files),
with Type=notify's $NOTIFY_SOCKET and a 3 s watchdog ($WATCHDOG_USEC; the main loop then
pings every second), and plays systemd's part: it reads every notification as it comes.
Then user nobody runs tests/slow_clients.py with the system's python3: CLIENTS
connections to the metrics port, each sending a request header one byte every 2 s and
reconnecting when closed. Meanwhile, five times a second, it counts the daemon's open
descriptors and threads and times a `status` call on the control socket, and once a
second it times a scrape. Prints the attacker's counts, then medians, 99th percentiles
and maxima from this one run. Needs root (to run the clients as nobody).

tests/test_metrics.py runs `run()` and checks the bounds; docs/metrics.md has the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SLOW_CLIENTS = Path(__file__).resolve().parent.parent / "tests" / "slow_clients.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # the attacker's: user nobody may not reach the venv
NOBODY = 65534
DEFAULT_SOFT_NOFILE = 1024  # what a unit gets without LimitNOFILE= (DefaultLimitNOFILE=)
WATCHDOG_USEC = 3_000_000  # as tests/nspawn's drop-in
CONTROL_TIMEOUT = 5.0  # seconds a status call may take before it counts as failed
SCRAPE_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.2  # seconds between two looks at the daemon
SCRAPE_INTERVAL = 1.0


@dataclass
class Flood:
    """What happened during one flood."""

    attack: dict  # slow_clients.py's counts: opened, closed_by_server, most_open
    fds_before: int
    threads_before: int
    watchdog_seconds: float
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    status_seconds: list[float] = field(default_factory=list)
    status_failures: list[str] = field(default_factory=list)
    scrape_seconds: list[float | None] = field(default_factory=list)  # None: failed
    pings: list[float] = field(default_factory=list)  # monotonic times of WATCHDOG=1
    exit_code: int | None = None
    output: str = ""

    @property
    def fds_max(self) -> int:
        return max(self.fds)

    @property
    def threads_max(self) -> int:
        return max(self.threads)

    @property
    def ping_gap_max(self) -> float:
        return max(b - a for a, b in zip(self.pings, self.pings[1:], strict=False))

    @property
    def scrapes_ok(self) -> list[float]:
        return [s for s in self.scrape_seconds if s is not None]

    def summary(self) -> str:
        ok = self.scrapes_ok
        return "\n".join(
            [
                f"attacker: {self.attack}",
                f"daemon descriptors: {self.fds_before} before, median {_median(self.fds)}, "
                f"max {self.fds_max}",
                f"daemon threads: {self.threads_before} before, max {self.threads_max}",
                f"status: {len(self.status_seconds)} answered, {len(self.status_failures)} "
                f"failed; {_ms(self.status_seconds)}",
                f"WATCHDOG=1: {len(self.pings)}, longest gap {self.ping_gap_max:.2f} s "
                f"(watchdog {self.watchdog_seconds:g} s)",
                f"scrapes: {len(ok)}/{len(self.scrape_seconds)} answered; {_ms(ok)}",
            ]
        )


def _median(values: list[int]) -> float:
    return statistics.median(values) if values else float("nan")


def _ms(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"median {statistics.median(ordered) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
        f"max {ordered[-1] * 1e3:.0f} ms"
    )


class NotifyListener:
    """systemd's end of $NOTIFY_SOCKET, read on a thread as systemd does."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.path, self.pings, self.ready = path, [], threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                message = self.sock.recv(4096)
                if b"WATCHDOG=1" in message:
                    self.pings.append(time.monotonic())
                if b"READY=1" in message:
                    self.ready.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def control_call(path: str, method: str) -> dict:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(CONTROL_TIMEOUT)
        client.connect(path)
        client.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
        return json.loads(client.makefile().readline())["result"]


def slow_clients_as_nobody(directory: str, port: int, count: int, seconds: float):
    """tests/slow_clients.py run as user nobody by the system's python3."""
    script = Path(directory, "slow_clients.py")
    shutil.copy(SLOW_CLIENTS, script)
    script.chmod(0o644)
    os.chmod(directory, 0o755)
    return subprocess.Popen(
        [SYSTEM_PYTHON, str(script), str(port), str(count), str(seconds)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(run_dir: str, clients: int, seconds: float) -> Flood:
    """One flood against a fresh `ixyd --demo` whose files go to run_dir."""
    notify = NotifyListener(os.path.join(run_dir, "notify"))
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ixyd.service", "--demo", "--demo-rate", "1000"]
        + ["--run-dir", run_dir, "--state-dir", run_dir, "--metrics", "127.0.0.1:0"],
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (DEFAULT_SOFT_NOFILE, hard)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    control = os.path.join(run_dir, "demo.sock")
    attacker = None
    try:
        if not notify.ready.wait(60):
            raise RuntimeError("the daemon sent no READY=1 within 60 s")
        url = control_call(control, "status")["metrics"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        flood = Flood(
            attack={},
            fds_before=_count(f"/proc/{proc.pid}/fd"),
            threads_before=_count(f"/proc/{proc.pid}/task"),
            watchdog_seconds=WATCHDOG_USEC / 1e6,
        )
        attacker = slow_clients_as_nobody(run_dir, port, clients, seconds)
        scraper = threading.Thread(target=_scrape, args=(url, attacker, flood), daemon=True)
        scraper.start()
        pings_before = len(notify.pings)
        while attacker.poll() is None:
            flood.fds.append(_count(f"/proc/{proc.pid}/fd"))
            flood.threads.append(_count(f"/proc/{proc.pid}/task"))
            asked = time.monotonic()
            try:
                control_call(control, "status")
                flood.status_seconds.append(time.monotonic() - asked)
            except (OSError, ValueError, KeyError) as exc:
                flood.status_failures.append(repr(exc))
            time.sleep(SAMPLE_INTERVAL)
        flood.pings = notify.pings[pings_before:]
        out, err = attacker.communicate(timeout=60)
        if attacker.returncode != 0:
            raise RuntimeError(f"slow_clients.py failed: {err}")
        flood.attack = json.loads(out)
        scraper.join(SCRAPE_TIMEOUT + 10)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        proc.terminate()
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        notify.close()
    flood.exit_code, flood.output = proc.returncode, output
    return flood


def _count(directory: str) -> int:
    return len(os.listdir(directory))


def _scrape(url: str, attacker: subprocess.Popen, flood: Flood) -> None:
    while attacker.poll() is None:
        asked = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as reply:
                ok = b"ixyd_link_up" in reply.read()
        except OSError:
            ok = False
        flood.scrape_seconds.append(time.monotonic() - asked if ok else None)
        time.sleep(SCRAPE_INTERVAL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (runs the slow clients as user nobody)")
    run_dir = tempfile.mkdtemp(prefix="ixyd-flood-")
    try:
        flood = run(run_dir, args.clients, args.seconds)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(flood.summary())
    print(f"daemon exit status {flood.exit_code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
