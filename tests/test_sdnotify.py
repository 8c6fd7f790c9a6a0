"""The daemon's sd_notify messages (READY, STATUS, WATCHDOG, RELOADING, STOPPING), read
from a real `ixyd` process.

The test plays systemd's part: it binds the AF_UNIX datagram socket that $NOTIFY_SOCKET
names and reads what the daemon sends there: READY=1 with a STATUS= once it runs, STATUS=
lines with link and rates, WATCHDOG=1 only while every worker makes progress (a stalled
worker stops the pings), RELOADING=1 around SIGHUP and STOPPING=1 at the end. The same
under real systemd is in tests/nspawn/.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ixyd.sdnotify import Notifier, ProgressWatchdog, status_text, watchdog_usec

BIN = Path(sys.executable).parent
WATCHDOG_USEC = 1_500_000  # the daemon's main loop then runs every 0.5 s


class NotifySocket:
    """What systemd's notify socket receives, message by message (dicts of KEY=value)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []
        self._looked_at = 0  # messages before this one were searched by wait_for

    def read_for(self, seconds: float) -> list[dict[str, str]]:
        """Every message that arrives within `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.messages += got
        return got

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """The next message with `key` after the one the last wait_for returned."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._looked_at, len(self.messages)):
                if key in self.messages[i]:
                    self._looked_at = i + 1
                    return self.messages[i]
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")
            self.read_for(0.2)


MODEL_CONFIG = """\
[[port]]
address = "card.0"
forward = "drop"
rx_ring = 64
tx_ring = 64
pool_size = 256
"""


# The demo's two ports, with inject_fault served (the stall test needs it)
FAULTY_DEMO_CONFIG = """\
fault_injection = true

[[port]]
address = "demo.0"
forward = {mode = "port", to = "demo.1"}

[[port]]
address = "demo.1"
forward = {mode = "port", to = "demo.0"}

[model_traffic]
rate = 1000
"""


@pytest.fixture(params=[["demo", "--config", "{dir}/demo.toml"]])
def notified_daemon(request):
    """An ixyd started as systemd would with Type=notify and WatchdogSec=1.5s (params:
    its command line; {dir} stands for its directory)."""
    directory = tempfile.mkdtemp(prefix="ixyd-sd-")
    Path(directory, "card.toml").write_text(MODEL_CONFIG)
    Path(directory, "demo.toml").write_text(FAULTY_DEMO_CONFIG)
    notify = NotifySocket(os.path.join(directory, "notify"))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "IXYD_RUN_DIR": directory,
    }
    env.pop("WATCHDOG_PID", None)  # unset: meant for whoever reads it, the daemon
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ixyd.service"]
        + [arg.format(dir=directory) for arg in request.param]
        + ["--run-dir", directory, "--state-dir", directory],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, notify, env
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    notify.sock.close()
    subprocess.run(["rm", "-rf", directory], check=False)


def test_ready_status_watchdog_and_a_stalled_worker_stops_the_pings(notified_daemon):
    proc, notify, env = notified_daemon
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1"
    # READY comes after the control socket serves: ixyd-ctl answers right away
    status = subprocess.run(
        [str(BIN / "ixyd-ctl"), "-i", "demo", "status"], env=env, capture_output=True, timeout=10
    )
    assert status.returncode == 0, status.stderr
    assert "demo.0 link up" in ready["STATUS"] and "demo.1 link up" in ready["STATUS"]
    assert any("EXTEND_TIMEOUT_USEC" in m for m in notify.messages[: notify.messages.index(ready)])

    healthy = notify.read_for(2.5)
    pings = [m for m in healthy if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3, healthy  # about every 0.5 s while the workers poll
    rates = [m["STATUS"] for m in healthy if "STATUS" in m and "rx " in m["STATUS"]]
    assert rates and "pps" in rates[-1], healthy

    stalled = subprocess.run(
        [str(BIN / "ixyd-ctl"), "-i", "demo", "debug", "stall-worker", "--worker", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert stalled.returncode == 0, stalled.stderr
    notify.read_for(1.0)  # a ping already on its way when the worker stalled
    after = notify.read_for(2.5)
    assert not [m for m in after if "WATCHDOG" in m], after
    assert any("STATUS" in m for m in after)  # the main loop itself still runs

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "made no progress" in out and "withholding the watchdog ping" in out
    assert any(m.get("STOPPING") == "1" for m in notify.read_for(0.5)), notify.messages[-3:]


@pytest.mark.parametrize(
    "notified_daemon", [["card", "--config", "{dir}/card.toml"]], indirect=True
)
def test_sighup_reports_reloading_then_ready(notified_daemon):
    proc, notify, _ = notified_daemon
    notify.wait_for("READY")
    proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", timeout=10)
    assert reloading["RELOADING"] == "1"
    ready = notify.wait_for("READY", timeout=10)
    assert ready["READY"] == "1" and ready["STATUS"].startswith("card.0 link")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_period is None
    notifier.ready("x")
    notifier.watchdog()


def test_watchdog_usec_is_only_for_the_process_it_names():
    assert watchdog_usec({"WATCHDOG_USEC": "3000000"}, 42) == 3_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 42) == 3_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "41"}, 42) is None
    assert watchdog_usec({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_usec({"WATCHDOG_USEC": "0"}, 42) is None


class FakeWorker:
    def __init__(self, name: str, native_id: int):
        self.name, self.native_id, self.running, self.iterations = name, native_id, True, 0
        self.cpu = ("R", 0)  # what /proc/self/task/<id>/stat would say: state, CPU ticks

    @property
    def stats(self) -> dict[str, int]:
        return {"iterations": self.iterations}


def test_progress_watchdog_pings_only_while_no_worker_is_hung():
    sent = []
    a, b = FakeWorker("w0", 1), FakeWorker("w1", 2)
    threads = {1: a, 2: b}
    watchdog = ProgressWatchdog(
        Notifier(sent.append, watchdog_usec=3_000_000),
        lambda: [a, b],
        thread_cpu=lambda tid: threads[tid].cpu,
    )
    assert watchdog.check()  # the first look has nothing to compare with
    a.iterations, b.iterations = 10, 10
    a.cpu = b.cpu = ("R", 50)
    assert watchdog.check()

    a.iterations, a.cpu = 20, ("R", 100)
    b.cpu = ("R", 100)  # b ran, but did no round: its loop spins (stall)
    assert not watchdog.check()
    assert not watchdog.check()
    b.iterations, b.cpu = 11, ("R", 150)  # b moves again; a moved since the last ping too
    a.iterations = 21
    assert watchdog.check()

    a.iterations = 22  # b got no CPU at all while runnable: starved, not hung
    assert watchdog.check()
    a.iterations = 23
    b.cpu = ("R", 151)  # ...then it had the CPU and still did no round: hung
    assert not watchdog.check()
    b.iterations = 12
    assert watchdog.check()

    a.iterations = 24
    b.cpu = ("S", 151)  # blocked, no CPU time, no round: hung (a deadlock)
    assert not watchdog.check()

    b.running = False  # a worker that ended is not waited for (the main loop logs it)
    a.iterations = 25
    assert watchdog.check()
    assert sent == ["WATCHDOG=1"] * 6


def test_progress_watchdog_without_a_watchdog_does_nothing():
    sent = []
    watchdog = ProgressWatchdog(Notifier(sent.append), lambda: [FakeWorker("w0", 1)])
    assert not watchdog.check() and sent == []


def test_status_text_names_link_and_rates():
    text = status_text(
        [
            ("card.0", True, 10000, {"rx_pps": 1_234_567.0, "tx_pps": 999.0}, False),
            ("card.1", False, 0, None, False),
            ("card.2", False, 0, {"rx_pps": 0.0, "tx_pps": 0.0}, True),
        ]
    )
    assert text == (
        "card.0 link up 10G, rx 1.23 Mpps, tx 999 pps; card.1 link down; card.2 removed"
    )


def test_a_failed_watchdog_ping_is_logged_as_an_error_once(tmp_path, caplog):
    """A WATCHDOG=1 that cannot be sent gets the instance killed, so it is an
    error in the log (once per kind of message while sending fails), and so is the
    recovery."""
    path = str(tmp_path / "notify")
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    with caplog.at_level(logging.INFO, logger="ixyd.sdnotify"):
        notifier.status("x")  # nobody listens at `path` yet
        notifier.watchdog()
        notifier.watchdog()
        notifier.status("y")
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2, caplog.text  # once for STATUS, once for WATCHDOG
        assert errors[0].startswith("sd_notify STATUS failed")
        assert errors[1].startswith("sd_notify WATCHDOG failed")
        assert "without WATCHDOG=1 systemd kills the instance" in errors[1]
        listener = NotifySocket(path)
        notifier.watchdog()
        assert listener.read_for(1.0) == [{"WATCHDOG": "1"}]
        assert "sd_notify works again" in caplog.text
    listener.sock.close()


PING_WITHOUT_DESCRIPTORS = """
import errno, os, resource, socket, sys
from ixyd.sdnotify import Notifier
notifier = Notifier.from_environment()           # at start, while descriptors are free
in_use = len(os.listdir("/proc/self/fd")) - 1    # (listdir's own descriptor is closed again)
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    socket.socket()
    sys.exit("a descriptor was still free")
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
notifier.watchdog()
"""


def test_the_watchdog_ping_needs_no_free_descriptor(tmp_path):
    """With every descriptor in use (what a flood of connections did), the
    ping still reaches systemd: the notify socket was opened once at start."""
    listener = NotifySocket(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "3000000"}
    env.pop("WATCHDOG_PID", None)
    done = subprocess.run(
        [sys.executable, "-c", PING_WITHOUT_DESCRIPTORS],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert listener.read_for(1.0) == [{"WATCHDOG": "1"}], done.stderr
    listener.sock.close()
