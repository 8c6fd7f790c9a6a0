#!/usr/bin/env python3
"""How long root waits for `status` while read-only group members flood the control
socket, against the same instance unflooded.

    .venv/bin/python benchmarks/control_fairness.py               # 10 pairs of windows
    .venv/bin/python benchmarks/control_fairness.py --pairs 4 --probes 30

Needs root (the hostile clients run as other users). The instance is the daemon's own
`Instance` (service.py) with the demo's two 82599 model ports, its control socket in a
temporary directory (mode 0660, group root), both spinning workers pinned to the last CPU
(`--worker-cpu`): the rest is the housekeeping the control thread, the clients and the
probe share, as on a host that keeps its poll cores for the workers. Hostile clients:
four uids (nobody, 4243, 4244, 4245), each a member of the socket's group (read-only:
`stats` is allowed), each trying to hold 16 connections: 64 in all, the server's whole
limit. Three of every four connections send, one line in flight, alternately a batch of
32 `stats` calls and a 64 KiB line of 1,480 (the attack of the issue; refused whole now),
reading the replies; the fourth sends 32-call batches and never reads. Connections the
server refuses retry every 0.2 s. Each client process gets its uid after the interpreter
has started as root (the interpreter may live where other users cannot go).

Root's probe is another process: one `status` call per fresh connection (as ixyd-ctl
makes it), timed from connect() to the reply, `--probes` per window, 10 ms apart.
Windows alternate between flooding (the hostile processes run) and quiet (they are
stopped with SIGSTOP; their connections stay open), so both share one run. Prints root's
p50/p99/max per variant, refusals and timeouts (must be 0), the server thread's longest
single step, the process's RSS before and after, and the log records the flood caused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

HOSTILE_UIDS = (65534, 4243, 4244, 4245)
CONNECTIONS_PER_UID = 16  # 4 x 16 = 64: every slot there is
RETRY = 0.2  # seconds before a refused hostile connection tries again
PROBE_GAP = 0.01  # seconds between root's calls
PROBE_TIMEOUT = 5.0


def stats_batch(count: int) -> bytes:
    requests = [{"jsonrpc": "2.0", "id": i, "method": "stats"} for i in range(count)]
    return json.dumps(requests, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------- client roles
def hostile(path: str, uid: int, gid: int, connections: int) -> None:
    """Flood as `uid` with supplementary group `gid` until killed (see the docstring)."""
    os.setgroups([gid])
    os.setgid(65534)
    os.setuid(uid)
    small, calls = stats_batch(32), 1500
    while len(big := stats_batch(calls)) > 64 * 1024:  # the longest line the server reads
        calls -= 10
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, dict] = {}

    def open_one(index: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        reader = index % 4 != 3
        state[sock] = {"index": index, "reader": reader, "buffer": b"", "out": b"", "turn": 0}
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def drop(sock: socket.socket, retry_at: dict) -> None:
        selector.unregister(sock)
        retry_at[state.pop(sock)["index"]] = time.monotonic() + RETRY
        sock.close()

    retry_at = {i: 0.0 for i in range(connections)}
    while True:
        now = time.monotonic()
        for index, when in list(retry_at.items()):
            if when <= now:
                del retry_at[index]
                open_one(index)
        for key, events in selector.select(timeout=RETRY):
            sock, s = key.fileobj, state[key.fileobj]
            try:
                if events & selectors.EVENT_READ:
                    data = sock.recv(1 << 20)
                    if not data:
                        drop(sock, retry_at)
                        continue
                    s["buffer"] += data
                    if b'"code":-32003' in s["buffer"]:  # refused: too many clients
                        drop(sock, retry_at)
                        continue
                    while b"\n" in s["buffer"]:
                        _, _, s["buffer"] = s["buffer"].partition(b"\n")
                        s["waiting"] = False
                if events & selectors.EVENT_WRITE:
                    if not s["out"] and (not s["reader"] or not s.get("waiting")):
                        s["turn"] += 1
                        s["out"] = big if s["reader"] and s["turn"] % 2 else small
                        s["waiting"] = True
                    if s["out"]:
                        sent = sock.send(s["out"])
                        s["out"] = s["out"][sent:]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                drop(sock, retry_at)


def probe() -> None:
    """Root's side: for each line `N` on stdin, N status calls; one JSON line of results
    (seconds, or "busy"/"timeout"/"error") on stdout."""
    path = sys.argv[sys.argv.index("--socket") + 1]
    request = b'{"jsonrpc":"2.0","id":1,"method":"status"}\n'
    for command in sys.stdin:
        results = []
        for _ in range(int(command)):
            started = time.perf_counter()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(PROBE_TIMEOUT)
            try:
                sock.connect(path)
                sock.sendall(request)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                elapsed = time.perf_counter() - started
                answer = json.loads(reply)
                if "result" in answer:
                    results.append(elapsed)
                else:
                    results.append("busy" if answer["error"]["code"] == -32003 else "error")
            except TimeoutError:
                results.append("timeout")
            except (OSError, ValueError):
                results.append("error")
            finally:
                sock.close()
            time.sleep(PROBE_GAP)
        print(json.dumps(results), flush=True)


# ---------------------------------------------------------------------------- the run
class LogCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> int:
    from ixyd.config import demo_config
    from ixyd.service import Instance, freeze_startup_objects

    workdir = tempfile.mkdtemp(prefix="ixyd-fair-")
    os.chmod(workdir, 0o755)
    config = demo_config(state_dir=workdir, rate=1000)
    if args.worker_cpu is not None:  # the poll core; the rest is housekeeping (README "Deploy")
        ports = tuple(dataclasses.replace(p, cpus=(args.worker_cpu,)) for p in config.ports)
        config = dataclasses.replace(config, ports=ports)
    instance = Instance(config, run_dir=workdir)
    counted = LogCount()
    logging.getLogger("ixyd.control").addHandler(counted)
    logging.getLogger("ixyd.control").setLevel(logging.INFO)
    gc_pauses: list[float] = []
    gc_started = [0.0]

    def gc_timer(phase: str, info: dict) -> None:  # Python's cyclic GC stops every thread
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(gc_timer)
    instance.start()
    if not args.no_freeze:
        freeze_startup_objects()  # as ixyd's main() does
    server = instance.server
    path = server.path
    gid = os.stat(path).st_gid
    me = [sys.executable, os.path.abspath(__file__), "--socket", path]
    prober = subprocess.Popen(
        [*me, "--role", "probe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    flooders = [
        subprocess.Popen([*me, "--role", "hostile", "--uid", str(uid), "--gid", str(gid)])
        for uid in HOSTILE_UIDS
    ]

    def measure(n: int) -> list:
        prober.stdin.write(f"{n}\n")
        prober.stdin.flush()
        return json.loads(prober.stdout.readline())

    results: dict[str, list] = {"quiet": [], "flood": []}
    rss_before = rss_mib()
    records_before = counted.records
    try:
        deadline = time.monotonic() + 60  # the flood sets in: every slot it may have
        while server.client_count < 56 and time.monotonic() < deadline:
            time.sleep(0.1)
        held = server.client_count
        for pair in range(args.pairs):
            for variant in ("flood", "quiet") if pair % 2 else ("quiet", "flood"):
                for proc in flooders:
                    proc.send_signal(signal.SIGCONT if variant == "flood" else signal.SIGSTOP)
                time.sleep(0.3)
                results[variant].extend(measure(args.probes))
        rss_after = rss_mib()
    finally:
        for proc in flooders:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        prober.stdin.close()
        prober.wait()
        instance.stop()
    longest = getattr(server, "longest_step", None)

    print(f"date:     {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(
        f"machine:  {platform.node()}, {os.cpu_count()} CPUs; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(f"python:   {platform.python_implementation()} {platform.python_version()}")
    print(
        f"setup:    demo instance (2 model ports); {len(HOSTILE_UIDS)} group members x "
        f"{CONNECTIONS_PER_UID} connections; {held} connections held at the flood's start; "
        f"{args.pairs} pairs of windows, {args.probes} root status calls each; both "
        + (
            f"workers on CPU {args.worker_cpu}"
            if args.worker_cpu is not None
            else "workers unpinned"
        )
    )
    for variant in ("quiet", "flood"):
        values = results[variant]
        times = [v * 1000 for v in values if isinstance(v, float)]
        failed = {k: values.count(k) for k in ("busy", "timeout", "error") if k in values}
        shown = (
            f"p50 {statistics.median(times):6.2f} ms  p99 {percentile(times, 0.99):6.2f} ms  "
            f"max {max(times):6.2f} ms"
            if times
            else "no answer"
        )
        failures = f"refused/failed: {failed or 0}"
        print(f"root status, {variant:<5} {len(times):4d} answered  {shown}  {failures}")
    if longest is not None:  # (wall clock, CPU time) of the thread
        print(
            f"server:   longest step of the control thread {longest[0] * 1000:.2f} ms "
            f"({longest[1] * 1000:.2f} ms of CPU time)"
        )
    if gc_pauses:
        print(
            f"gc:       {len(gc_pauses)} collections in the process, longest "
            f"{max(gc_pauses) * 1000:.2f} ms"
        )
    print(f"memory:   RSS {rss_before:.0f} MiB before the flood, {rss_after:.0f} MiB after")
    print(
        f"log:      {counted.records - records_before} records from ixyd.control during the flood"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="pairs of quiet/flood windows")
    parser.add_argument("--probes", type=int, default=50, help="root status calls per window")
    parser.add_argument(
        "--worker-cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="CPU for both spinning workers (default: the last); -1: leave them unpinned",
    )
    parser.add_argument(
        "--no-freeze", action="store_true", help="skip gc.freeze() after the start (as before)"
    )
    parser.add_argument("--role", choices=("run", "hostile", "probe"), default="run")
    parser.add_argument("--socket")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    args = parser.parse_args()
    if args.role == "hostile":
        hostile(args.socket, args.uid, args.gid, CONNECTIONS_PER_UID)
        return 0
    if args.role == "probe":
        probe()
        return 0
    if os.geteuid() != 0:
        parser.error("needs root: the hostile clients run as other users")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.worker_cpu < 0:
        args.worker_cpu = None
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
