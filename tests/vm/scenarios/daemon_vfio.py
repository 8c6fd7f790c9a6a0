"""The daemon on real VFIO devices: `ixyd` runs an instance of the guest's two igb
ports (taken from the kernel's igb driver), `ixyd-ctl` queries and steers it over the control
socket, frames go through the data path, and SIGTERM gives both ports back to igb.

Runs inside the test guest as root with igb loaded (tests/vm/harness.py,
with_igb_driver=True). Steps:

 1. MAC -> PCI address of both igb functions (while igb has them).
 2. A config for instance `vfio-guest`: both ports on the vfio backend, 1 RX queue, small
    rings and pools, port A forwarding to B and B to A, give_back on.
 3. `ixyd vfio-guest --config F --run-dir D --state-dir S`; wait for its socket.
 4. `ixyd-ctl --json` status, ports, link, stats: running, driver igb, link up at 1000 Mb/s.
 5. Traffic: B reflects, then A generates GENERATE_COUNT frames (60 bytes, 1000/s): B
    receives and transmits them all back, A receives them (and drops them: mode generate).
    The two ports share one wire, so A -> B and B -> A forwarding at once would loop
    every frame between them forever; the start-up forwarding is only checked, unused.
 6. SIGTERM: exit status 0 within STOP_TIMEOUT, socket gone, both functions on igb again
    with a netdev, no DMAR fault in dmesg.

Prints a JSON summary as its last line; exit status 0 when every check passed.
"""

from __future__ import annotations

import json
import os
import signal
import socket as socketlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest_pci  # noqa: E402
from guest_checks import (  # noqa: E402
    check,
    dmar_faults,
    netdevs,
    run_and_report,
    step,
    wait_for,
)

MAC_A, MAC_B = "52:54:00:00:00:01", "52:54:00:00:00:02"
INSTANCE = "vfio-guest"
WORK = Path("/tmp/ixyd-daemon")
RUN_DIR, STATE_DIR = WORK / "run", WORK / "state"
CONFIG = WORK / f"{INSTANCE}.toml"
LOG = WORK / "ixyd.log"
VENV_BIN = Path(sys.executable).parent
SOCKET_TIMEOUT = 60.0  # s for ixyd to bring both ports up and serve its socket
STOP_TIMEOUT = 10.0  # s from SIGTERM to exit, give-back included
GENERATE_COUNT = 500
COUNTER_TIMEOUT = 10.0
# The guest has 2 vCPUs and workers busy-poll: both workers share CPU 1, so that the
# control thread, ixyd-ctl and this script (CPU 0) are not starved under TCG.
WORKER_CPU, CONTROL_CPU = 1, 0


def config_text(bdf_a: str, bdf_b: str) -> str:
    port = """
[[port]]
address = "{address}"
backend = "vfio"
rx_queues = 1
rx_ring = 256
tx_ring = 256
pool_size = 512
link_timeout = 10.0
cpus = [{worker_cpu}]
forward = {{mode = "port", to = "{to}"}}
"""
    return (
        f'instance = "{INSTANCE}"\nstate_dir = "{STATE_DIR}"\ngive_back = true\n'
        + port.format(address=bdf_a, to=bdf_b, worker_cpu=WORKER_CPU)
        + port.format(address=bdf_b, to=bdf_a, worker_cpu=WORKER_CPU)
    )


def ctl(*args: str) -> dict:
    """`ixyd-ctl -i INSTANCE --json ARGS`; its JSON result (CheckFailed on a non-zero exit)."""
    step(f"ixyd-ctl {' '.join(args)}")
    env = {**os.environ, "IXYD_RUN_DIR": str(RUN_DIR)}
    command = [str(VENV_BIN / "ixyd-ctl"), "-i", INSTANCE, "--json", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    check(
        done.returncode == 0,
        f"ixyd-ctl {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}",
    )
    return json.loads(done.stdout)


def rpc(method: str, **params) -> dict:
    """One JSON-RPC call straight on the socket: for polling, where starting ixyd-ctl
    (a Python process over 9p, seconds under TCG) each time would be too slow."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(str(RUN_DIR / f"{INSTANCE}.sock"))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            check(chunk != b"", f"{method}: connection closed")
            data += chunk
    reply = json.loads(data)
    check("result" in reply, f"{method}: {reply.get('error')}")
    return reply["result"]


def counters(name: str) -> dict:
    (entry,) = rpc("stats", port=name)["ports"]
    return entry["counters"]


def run(summary: dict, timings: dict) -> None:
    started = time.monotonic()
    addresses = guest_pci.igb_addresses_in_guest()
    check({MAC_A, MAC_B} <= set(addresses), f"igb ports found: {addresses}")
    bdf_a, bdf_b = addresses[MAC_A], addresses[MAC_B]
    summary["ports_by_mac"] = {MAC_A: bdf_a, MAC_B: bdf_b}
    summary["before"] = {
        bdf: {"driver": guest_pci.bound_driver(bdf), "netdevs": netdevs(bdf)}
        for bdf in (bdf_a, bdf_b)
    }
    check(
        all(v["driver"] == "igb" and v["netdevs"] for v in summary["before"].values()),
        f"igb does not hold both ports at the start: {summary['before']}",
    )

    for d in (RUN_DIR, STATE_DIR):
        d.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(config_text(bdf_a, bdf_b))
    socket = RUN_DIR / f"{INSTANCE}.sock"
    command = [str(VENV_BIN / "ixyd"), INSTANCE, "--config", str(CONFIG),
               "--run-dir", str(RUN_DIR), "--state-dir", str(STATE_DIR)]  # fmt: skip
    log = LOG.open("w")
    t0 = time.monotonic()
    step("starting ixyd")
    every_cpu = set(range(os.cpu_count() or 1))
    daemon = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, every_cpu),  # this script is on CPU 0
    )
    try:
        up = wait_for(lambda: socket.exists() or daemon.poll() is not None, SOCKET_TIMEOUT)
        check(
            up and daemon.poll() is None,
            f"ixyd did not serve {socket} (exit {daemon.poll()})",
        )
        timings["daemon_start_s"] = round(time.monotonic() - t0, 2)
        exercise(summary, timings, bdf_a, bdf_b)
    finally:
        t0 = time.monotonic()
        step("SIGTERM")
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            summary["exit_status"] = daemon.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.kill()
            summary["exit_status"] = f"killed: no exit {STOP_TIMEOUT} s after SIGTERM"
            daemon.wait()
        timings["stop_s"] = round(time.monotonic() - t0, 2)
        log.close()

    step(f"ixyd exited: {summary['exit_status']}")
    check(summary["exit_status"] == 0, f"ixyd exit status {summary['exit_status']}")
    summary["socket_after_exit"] = socket.exists()
    check(not summary["socket_after_exit"], f"{socket} left behind")
    summary["after"] = {
        bdf: {"driver": guest_pci.bound_driver(bdf), "netdevs": netdevs(bdf)}
        for bdf in (bdf_a, bdf_b)
    }
    check(
        all(v["driver"] == "igb" and v["netdevs"] for v in summary["after"].values()),
        f"ports not back on igb with their netdevs: {summary['after']}",
    )
    summary["dmar_faults"] = dmar_faults()
    check(summary["dmar_faults"] == [], f"DMAR faults: {summary['dmar_faults']}")
    timings["total_s"] = round(time.monotonic() - started, 2)


def exercise(summary: dict, timings: dict, bdf_a: str, bdf_b: str) -> None:
    t0 = time.monotonic()
    status = ctl("status")
    timings["first_ctl_s"] = round(time.monotonic() - t0, 2)
    summary["status"] = {k: status[k] for k in ("instance", "state", "ports", "workers")}
    check(status["state"] == "running", f"status: {status}")
    check(status["ports"] == [bdf_a, bdf_b], f"status ports: {status['ports']}")

    ports = {p["name"]: p for p in ctl("ports")["ports"]}
    summary["ports"] = {
        name: {k: p[k] for k in ("driver", "device", "mac", "backend", "forward", "link")}
        for name, p in ports.items()
    }
    check(ports[bdf_a]["mac"] == MAC_A and ports[bdf_b]["mac"] == MAC_B, f"MACs: {ports}")
    for name, to in ((bdf_a, bdf_b), (bdf_b, bdf_a)):
        check(ports[name]["driver"] == "igb" and ports[name]["backend"] == "vfio", f"{ports}")
        check(ports[name]["forward"] == {"mode": "port", "to": to}, f"forward: {ports[name]}")

    t0 = time.monotonic()
    linked = wait_for(
        lambda: all(p["up"] for p in rpc("link")["ports"]), 10.0
    )  # the driver waited at start, but do not rely on it
    timings["link_wait_s"] = round(time.monotonic() - t0, 2)
    summary["link"] = {p["name"]: [p["up"], p["speed_mbps"]] for p in ctl("link")["ports"]}
    check(linked, f"link: {summary['link']}")
    check(all(v == [True, 1000] for v in summary["link"].values()), f"link: {summary['link']}")

    before = {p["name"]: p["counters"] for p in ctl("stats")["ports"]}
    summary["counters_before"] = before
    summary["set_forward"] = [
        ctl("set-forward", bdf_b, "reflect"),
        ctl(
            "set-forward",
            bdf_a,
            "generate",
            "--size",
            "60",
            "--rate",
            "1000",
            "--count",
            str(GENERATE_COUNT),
        ),  # fmt: skip
    ]
    t0 = time.monotonic()

    def delta(name: str, key: str) -> int:
        return counters(name)[key] - before[name][key]

    arrived = wait_for(lambda: delta(bdf_a, "rx_packets") >= GENERATE_COUNT, COUNTER_TIMEOUT)
    timings["traffic_s"] = round(time.monotonic() - t0, 2)
    time.sleep(0.3)  # nothing more may come
    after = {p["name"]: p["counters"] for p in ctl("stats")["ports"]}
    summary["counters_after"] = after
    d = {
        name: {k: after[name][k] - before[name].get(k, 0) for k in after[name]}
        for name in (bdf_a, bdf_b)
    }
    keys = ("generated", "tx_packets", "tx_good_packets", "rx_packets", "rx_good_packets",
            "forwarded", "dropped_by_mode", "rx_no_descriptor", "drop_tx_full")  # fmt: skip
    summary["delta"] = {name: {k: d[name].get(k) for k in keys} for name in d}
    n = GENERATE_COUNT
    a, b = d[bdf_a], d[bdf_b]
    check(arrived, f"A received {a['rx_packets']} of {n} reflected frames: {summary['delta']}")
    check(a["generated"] == n and a["tx_packets"] == n, f"A sent: {summary['delta']}")
    check(b["rx_packets"] == n and b["rx_good_packets"] == n, f"B got: {summary['delta']}")
    check(b["forwarded"] == n and b["tx_packets"] == n, f"B reflected: {summary['delta']}")
    check(a["rx_packets"] == n and a["dropped_by_mode"] == n, f"A got: {summary['delta']}")
    forward = {p["name"]: p["forward"] for p in rpc("get_forward")["ports"]}
    summary["forward_after"] = forward
    check(forward[bdf_b] == {"mode": "reflect", "swap_mac": False}, f"forward: {forward}")
    check(forward[bdf_a]["mode"] == "generate", f"forward: {forward}")


def main() -> int:
    os.sched_setaffinity(0, {CONTROL_CPU})  # and ixyd-ctl, started from here
    summary: dict = {"scenario": "daemon_vfio", "generate_count": GENERATE_COUNT}
    timings: dict = {}
    summary["timings"] = timings

    def attach_daemon_log() -> None:
        if LOG.exists():
            text = LOG.read_text()
            summary["daemon_log_tail"] = text.splitlines()[-40:]
            summary["daemon_log_errors"] = [x for x in text.splitlines() if " ERROR " in x]
            print("---- ixyd log ----\n" + text, file=sys.stderr, flush=True)

    return run_and_report(summary, lambda: run(summary, timings), after=attach_daemon_log)


if __name__ == "__main__":
    sys.exit(main())
