"""End to end: a real `ixyd --demo` process on the model, steered with `ixyd-ctl`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hosttools import Daemon

FRAMES = 12_000  # per direction
RATE = 6_000  # frames/s per direction: low enough for a 2-CPU CI box to lose nothing


def demo_daemon(tmp: Path, *extra: str) -> Daemon:
    """`ixyd --demo` with its socket and state in `tmp`."""
    return Daemon(str(tmp), ["--demo", *extra])


def stop(d: Daemon) -> tuple[int, str, float]:
    """SIGTERM: the exit code, the log and how long the stop took."""
    started = time.monotonic()
    code = d.terminate()
    return code, d.log, time.monotonic() - started


@pytest.fixture
def daemon(tmp_path):
    d = demo_daemon(tmp_path, "--demo-rate", str(RATE), "--demo-frames", str(FRAMES))
    yield d
    d.kill()


def traffic(d: Daemon) -> dict[str, dict]:
    return {t["port"]: t for t in d.json("stats")["traffic"]}


def test_status_ports_and_stats_answer(daemon):
    status = daemon.json("status")
    assert status["instance"] == "demo" and status["state"] == "running"
    assert status["ports"] == ["demo.0", "demo.1"] and status["workers"] == 2
    ports = daemon.json("ports")["ports"]
    assert [p["forward"] for p in ports] == [
        {"mode": "port", "to": "demo.1"},
        {"mode": "port", "to": "demo.0"},
    ]
    assert all(p["link"]["up"] for p in ports)
    time.sleep(0.3)
    stats = daemon.json("stats")
    assert all(p["counters"]["rx_packets"] > 0 for p in stats["ports"])
    assert "RX PACKETS" in daemon.ctl("stats").stdout
    assert daemon.json("reset-stats")["ports"] == ["demo.0", "demo.1"]
    assert daemon.ctl("set-forward", "demo.9", "drop", check=False).returncode == 1


def test_mode_switches_under_traffic_lose_and_duplicate_nothing(daemon):
    """demo.0 flips between forwarding to demo.1 and reflecting while sequence-numbered
    frames flow: every frame of generator 0 is checked exactly once, leaving demo.1 (its
    checker's unique frames) or, reflected, demo.0 (foreign to that checker), or is counted
    as dropped by a named reason. A worker starved of CPU on a loaded machine may overflow
    a ring, and such drops are counted; a switch must never lose a frame silently."""
    for mode in (["reflect"], ["port", "demo.1"], ["reflect", "--swap-mac"], ["port", "demo.1"]):
        daemon.ctl("set-forward", "demo.0", *mode)
        time.sleep(0.25)

    def dropped(counters: dict) -> int:
        return sum(counters[k] for k in ("rx_no_descriptor", "rx_missed", "drop_tx_full"))

    deadline = time.monotonic() + 15
    while True:
        t = traffic(daemon)
        counters = {p["name"]: p["counters"] for p in daemon.json("stats")["ports"]}
        from_0 = t["demo.1"]["unique"] + t["demo.0"]["foreign"] + dropped(counters["demo.0"])
        from_1 = t["demo.0"]["unique"] + dropped(counters["demo.1"])
        sent = t["demo.0"]["sent"] == t["demo.1"]["sent"] == FRAMES
        if sent and from_0 >= FRAMES and from_1 >= FRAMES:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"frames unaccounted for: {t} {counters}")
        time.sleep(0.1)
    assert t["demo.0"]["foreign"] > 0, "no frame was reflected"
    assert from_0 == FRAMES and from_1 == FRAMES  # delivered once or counted, nothing else
    assert t["demo.1"]["unique"] + t["demo.0"]["foreign"] > FRAMES // 2  # mostly delivered
    for side in t.values():
        assert side["duplicates"] == 0 and side["corrupt"] == 0


def test_restart_restores_forwarding_and_sigterm_cleans_up(tmp_path):
    d = demo_daemon(tmp_path, "--demo-rate", "1000")
    d.ctl("set-forward", "demo.1", "reflect", "--swap-mac")
    d.ctl("set-promisc", "demo.0", "off")
    code, out, took = stop(d)
    assert code == 0, out
    assert took < 5
    assert not d.socket.exists()
    assert json.loads((tmp_path / "demo.json").read_text())["ports"]["demo.1"]["forward"] == {
        "mode": "reflect",
        "swap_mac": True,
    }
    d = demo_daemon(tmp_path, "--demo-rate", "1000")
    try:
        forward = {p["name"]: p["forward"] for p in d.json("get-forward")["ports"]}
        assert forward["demo.1"] == {"mode": "reflect", "swap_mac": True}
        assert forward["demo.0"] == {"mode": "port", "to": "demo.1"}
        assert [p["promisc"] for p in d.json("ports")["ports"]] == [False, True]
    finally:
        code, out, _ = stop(d)
    assert code == 0, out


def test_corrupt_state_file_is_set_aside(tmp_path):
    (tmp_path / "demo.json").write_text("{not json")
    d = demo_daemon(tmp_path, "--demo-rate", "1000")
    try:
        assert d.json("get-forward")["ports"][0]["forward"] == {"mode": "port", "to": "demo.1"}
        assert (tmp_path / "demo.json.bad").read_text() == "{not json"
    finally:
        stop(d)


def test_state_file_nested_too_deep_for_json_is_set_aside(tmp_path):
    """json.loads raises RecursionError, not ValueError, past the interpreter's recursion
    limit: it crashed the start (and systemd restarted it into the same crash)."""
    deep = '{"version": 1, "ports": {"demo.0": {"forward": ' + "[" * 100_000 + "]" * 100_000
    (tmp_path / "demo.json").write_text(deep + "}}}")
    d = demo_daemon(tmp_path, "--demo-rate", "1000")
    try:
        assert d.json("get-forward")["ports"][0]["forward"] == {"mode": "port", "to": "demo.1"}
        assert (tmp_path / "demo.json.bad").read_text() == deep + "}}}"
    finally:
        code, out, _ = stop(d)
    assert code == 0, out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (an interface to collide with)")
def test_saved_tap_whose_name_is_taken_is_set_aside_and_the_config_used(tmp_path):
    """A saved `tap` forwarding whose interface name another interface has taken meanwhile
    made the start exit 1, again at every restart: the instance starts with the
    configuration's forwarding, the entry leaves the state file, the file as it was is
    kept as .bad."""
    taken = f"ixtsystemd{os.getpid() % 10000}"
    peer = f"ixpsystemd{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", taken, "type", "veth", "peer", "name", peer], check=True)
    saved = {
        "version": 1,
        "ports": {
            "demo.0": {"forward": {"mode": "tap", "ifname": taken}, "promisc": False},
            "demo.1": {"forward": {"mode": "reflect", "swap_mac": True}},
        },
    }
    (tmp_path / "demo.json").write_text(json.dumps(saved))
    try:
        d = demo_daemon(tmp_path, "--demo-rate", "1000")
        try:
            forward = {p["name"]: p["forward"] for p in d.json("get-forward")["ports"]}
            assert forward["demo.0"] == {"mode": "port", "to": "demo.1"}  # the configuration's
            assert forward["demo.1"] == {"mode": "reflect", "swap_mac": True}  # restored
            assert [p["promisc"] for p in d.json("ports")["ports"]] == [False, True]
            state = json.loads((tmp_path / "demo.json").read_text())["ports"]
            assert state == {"demo.0": {"promisc": False}, "demo.1": saved["ports"]["demo.1"]}
            assert json.loads((tmp_path / "demo.json.bad").read_text()) == saved
        finally:
            code, out, _ = stop(d)
        assert code == 0, out
        assert f"interface {taken!r} already exists" in out
    finally:
        subprocess.run(["ip", "link", "del", taken], check=False)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
def test_tap_mode_hands_frames_to_the_kernel_and_its_tap_lives_as_long_as_the_instance(
    tmp_path,
):
    d = demo_daemon(tmp_path, "--demo-rate", "2000")
    ifname = f"ixyt{os.getpid() % 10000}"
    try:
        d.ctl("set-forward", "demo.0", "tap", ifname)
        rx_packets = Path(f"/sys/class/net/{ifname}/statistics/rx_packets")
        deadline = time.monotonic() + 15  # a loaded machine
        while int(rx_packets.read_text()) == 0:
            assert time.monotonic() < deadline, "no frame reached the kernel"
            time.sleep(0.05)
        index = Path(f"/sys/class/net/{ifname}/ifindex").read_text()
        d.ctl("set-forward", "demo.0", "port", "demo.1")
        # out of tap mode the TAP stays, the same interface: its kernel peers keep it
        assert Path(f"/sys/class/net/{ifname}/ifindex").read_text() == index
        d.ctl("set-forward", "demo.0", "tap", ifname)
        assert Path(f"/sys/class/net/{ifname}/ifindex").read_text() == index
        subprocess.run(["ip", "link", "del", ifname], check=True)  # someone deletes it
        d.ctl("set-forward", "demo.0", "port", "demo.1")
        d.ctl("set-forward", "demo.0", "tap", ifname)
        assert Path(f"/sys/class/net/{ifname}").exists()  # made anew
    finally:
        code, out, _ = stop(d)
    assert code == 0, out
    assert not Path(f"/sys/class/net/{ifname}").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ("[[port]]\naddress = 'demo.0'\nrx_ring = 100\n", ["rx_ring", "power of two"]),
        ("[[port]]\naddress = 'demo.0'\nbackend = 'dpdk'\n", ["backend", "vfio, model"]),
        ("colour = 1\n[[port]]\naddress = 'demo.0'\n", ["unknown key colour"]),
        ("[[port\n", ["not valid TOML"]),
    ],
)
def test_bad_config_is_refused_with_the_key(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ixyd.service",
            "bad",
            "--config",
            str(path),
            "--run-dir",
            str(tmp_path),
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    for word in words:
        assert word in done.stderr
    assert not (tmp_path / "bad.sock").exists()


LAB_CONFIG = """
[[port]]
address = "lab.0"
rx_ring = 256
tx_ring = 256
pool_size = 512
link_timeout = 0.05
forward = {{ mode = "port", to = "lab.1" }}

[[port]]
address = "lab.1"
rx_ring = 256
tx_ring = 256
pool_size = 512
link_timeout = 0.05
promisc = {promisc}
forward = {forward}
"""


def test_sighup_applies_what_the_file_changed_and_keeps_other_runtime_changes(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(LAB_CONFIG.format(promisc="true", forward='{ mode = "port", to = "lab.0" }'))
    d = Daemon(str(tmp_path), ["lab", "--config", str(path)], "lab")

    def ctl(*a: str) -> dict:
        return d.json(*a)

    try:
        ctl("set-forward", "lab.0", "reflect")  # a runtime change to a key the file keeps
        # the file changes lab.1's forwarding and promiscuous mode, not lab.0's
        path.write_text(LAB_CONFIG.format(promisc="false", forward='"drop"'))
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            ports = {p["name"]: p for p in ctl("ports")["ports"]}
            reloaded = ports["lab.1"]["forward"]["mode"] == "drop" and not ports["lab.1"]["promisc"]
            if reloaded or time.monotonic() > deadline:  # (a read may fall between the two)
                break
            time.sleep(0.1)
        assert ports["lab.1"]["forward"] == {"mode": "drop"}
        assert ports["lab.1"]["promisc"] is False
        assert ports["lab.0"]["forward"]["mode"] == "reflect"  # ixyd-ctl's change stays
        saved = json.loads((tmp_path / "lab.json").read_text())["ports"]
        assert saved["lab.1"]["forward"] == {"mode": "drop"} and saved["lab.1"]["promisc"] is False
    finally:
        code, out, _ = stop(d)
    assert code == 0, out
    assert "applied: lab.1 forward" in out


def test_reload_method_answers_and_a_refused_file_keeps_the_running_configuration(tmp_path):
    """`ixyd-ctl reload` (ExecReload= of ixyd@.service) re-reads the file and answers once
    done: a file the daemon refuses (TOML syntax, a misspelt key, changed ports) fails the
    call with the reason and the running configuration stays; a good one is applied."""
    path = tmp_path / "lab.toml"
    path.write_text(LAB_CONFIG.format(promisc="true", forward='{ mode = "port", to = "lab.0" }'))
    d = Daemon(str(tmp_path), ["lab", "--config", str(path)], "lab")

    def ctl(*a: str) -> subprocess.CompletedProcess:
        return d.ctl("--timeout", "20", *a, check=False, timeout=30)

    def forward_of_lab1() -> dict:
        done = ctl("--json", "get-forward", "lab.1")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["ports"][0]["forward"]

    good = LAB_CONFIG.format(promisc="true", forward='{ mode = "port", to = "lab.0" }')
    refused = {
        "[[port\n": "not valid TOML",
        "colour = 1\n" + good: "unknown key colour",
        good.replace("rx_ring = 256", "rx_ring = 128", 1): "restart the instance",
    }
    try:
        for text, reason in refused.items():
            path.write_text(text)
            done = ctl("reload")
            assert done.returncode == 1 and reason in done.stderr, (text, done)
            assert forward_of_lab1() == {"mode": "port", "to": "lab.0"}
        path.write_text(LAB_CONFIG.format(promisc="true", forward='"drop"'))
        done = ctl("reload")
        assert done.returncode == 0, done.stderr
        assert "applied: lab.1 forward" in done.stdout
        assert forward_of_lab1() == {"mode": "drop"}
        status = json.loads(ctl("--json", "status").stdout)
        assert status["state"] == "running"
    finally:
        code, out, _ = stop(d)
    assert code == 0, out
