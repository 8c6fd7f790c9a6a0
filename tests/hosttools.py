"""Helpers the host-side tests share: waiting for a condition, network namespaces with
commands and Python scripts run inside them, running an action as another user, a real
ixyd process with raw clients for its control socket, and a fake kernel's PCI sysfs.
Imported by name (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import grp  # noqa: F401  (ixyd-ctl's lazy imports, loaded before forking as nobody)
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ixyd import ctl
from ixyd.pci import Sysfs

NOBODY = 65534


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    detail: Callable[[], str] | None = None,
    interval: float = 0.005,
) -> None:
    """Poll predicate() until it is true; TimeoutError naming `what` (and detail()) after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out waiting for {what}" + (f": {detail()}" if detail else "")
            )
        time.sleep(interval)


# ---------------------------------------------------------------------------- namespaces
def run_in(netns: str, *argv: str, timeout: float = 15, **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside `netns`; CalledProcessError if it fails."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], check=True, timeout=timeout, **kwargs
    )


def python_in(netns: str, script: str) -> subprocess.Popen:
    """Start a Python `script` (dedented) inside `netns`; it reports on stdout."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def network_namespaces(prefix: str, count: int = 2) -> Iterator[list[str]]:
    """`count` fresh network namespaces without IPv6 (no MLD or router solicitations to
    disturb frame counts), deleted afterwards."""
    names = [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    made = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            for scope in ("all", "default"):
                run_in(name, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


# ---------------------------------------------------------------------------- other users
def run_as(uid: int, gid: int, groups: Sequence[int], action: Callable[[], Any]) -> Any:
    """Run `action()` in a child forked as uid/gid with supplementary `groups`; return what
    it returned (through JSON). Forked, not exec'd: the interpreter may live where the
    user cannot go. Modules the action imports lazily must be imported before."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no logging; only the action and the pipe
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            payload = json.dumps({"value": action()})
        except BaseException as exc:
            payload, code = json.dumps({"exception": repr(exc)}), 1
        os.write(write_end, payload.encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    outcome = json.loads(data)
    assert "exception" not in outcome, outcome["exception"]
    return outcome["value"]


def as_nobody(action: Callable[[], Any], groups: Sequence[int] = ()) -> Any:
    """run_as user and group nobody."""
    return run_as(NOBODY, NOBODY, groups, action)


# ---------------------------------------------------------------------------- a real ixyd
BIN = Path(sys.executable).parent
OPS_GID = 4242  # the control socket's group in the authorization test (nobody may join it)
RATE = 2_000  # demo frames/s per direction: traffic that must keep flowing
MAPPINGS_AT_EXIT = re.compile(r"model card (\S+): (\d+) DMA mappings at exit, (\d+) remain")

# Two model ports joined by a cable (their wires face each other, no traffic generator).
CABLED_CONFIG = """\
instance = "{instance}"
state_dir = "{state_dir}"

[[port]]
address = "demo.0"
backend = "model"
wire = "cable:demo.1"
forward = "drop"
link_timeout = 0.2  # its cable peer is not initialised yet

[[port]]
address = "demo.1"
backend = "model"
forward = "drop"
"""


class Daemon:
    """A real ixyd process; `ctl()` runs ixyd-ctl against it."""

    def __init__(self, run_dir: str, argv: list[str], instance: str = "demo"):
        self.run_dir = run_dir
        self.instance = instance
        self.socket = Path(run_dir) / f"{instance}.sock"
        self.env = {**os.environ, "IXYD_RUN_DIR": run_dir}
        self.env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ixyd.service", *argv]
            + ["--run-dir", run_dir, "--state-dir", run_dir],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log = ""
        deadline = time.monotonic() + 60  # ~1 s normally; allow for a starved CPU
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"ixyd did not start: {self.proc.communicate()[0]}")
            time.sleep(0.05)

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 15, **run
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "ixyd-ctl"), "-i", self.instance, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **run,
        )
        if check:
            assert done.returncode == 0, (args, done.stderr)
        return done

    def json(self, *args: str) -> dict:
        return json.loads(self.ctl("--json", *args).stdout)

    def counters(self) -> dict[str, dict[str, int]]:
        return {p["name"]: p["counters"] for p in self.json("stats")["ports"]}

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.log = self.proc.communicate(timeout=timeout)[0]
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.log = self.proc.communicate()[0]


def assert_clean_exit(d: Daemon) -> None:
    """SIGTERM: exit 0, the socket gone, every model DMA mapping released (the daemon's log)."""
    assert d.terminate() == 0, d.log
    assert not d.socket.exists(), "stale control socket left behind"
    found = MAPPINGS_AT_EXIT.findall(d.log)
    assert found, d.log
    for card, held, left in found:  # the ports unmapped everything; nothing was left over
        assert (int(held), int(left)) == (0, 0), (card, d.log)
    assert "Traceback" not in d.log and " ERROR " not in d.log, d.log
    assert f"instance {d.instance} stopped" in d.log


# ---------------------------------------------------------------------------- raw clients
class Client:
    """A raw client of a control socket: bytes in, lines out. Every client is closed after
    its test (conftest)."""

    opened: list[Client] = []

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        Client.opened.append(self)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = 1

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, or b'' at EOF (what is left of an unfinished last line)."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def reply(self):
        """The next reply line as JSON, or None when the server closed the connection."""
        line = self.line()
        return json.loads(line) if line.endswith(b"\n") else None

    def request(self, request) -> object:
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply()

    def call(self, method, params=None, request_id=None):
        """A request with `request_id`, or else the next of 1, 2, 3..."""
        if request_id is None:
            request_id, self.next_id = self.next_id, self.next_id + 1
        request = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        return self.request(request)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def code(reply) -> int:
    assert reply is not None and "error" in reply, reply
    return reply["error"]["code"]


def ctl_main(d: Daemon, *args: str):
    """An action for as_nobody: ixyd-ctl's main() on the daemon's socket -> (code, out, err)."""

    def action():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = ctl.main(["--socket", str(d.socket), *args])
            except SystemExit as exc:
                code = exc.code
        return [code, out.getvalue(), err.getvalue()]

    return action


def raw_call(d: Daemon, method: str, params: dict):
    """An action for as_nobody: one JSON-RPC call on a raw connection -> the reply, or
    "EACCES" when the socket's permissions refuse the connection."""

    def action():
        try:
            client = Client(d.socket)
        except PermissionError:
            return "EACCES"
        try:
            return client.call(method, params, request_id=7)
        finally:
            client.close()

    return action


# ---------------------------------------------------------------------------- a fake sysfs
class FakeKernel(Sysfs):
    """Sysfs on a tmp tree that reacts to writes the way the PCI core does."""

    def __init__(self, root: str, natural_driver: dict[str, str]):
        super().__init__(root)
        self.natural_driver = natural_driver  # what drivers_probe binds without an override
        self.refuse = set()  # drivers whose probe fails
        self.writes: list[tuple[str, str]] = []

    def write(self, text: str, *parts: str) -> None:
        super().write(text, *parts)  # the plain file keeps the last value written
        relative = os.path.join(*parts)
        self.writes.append((relative, text))
        if parts[-1] == "unbind":
            address = text
            link = self.path("bus", "pci", "devices", address, "driver")
            os.unlink(link)
            for name in self.netdevs(address):
                os.rmdir(self.path("bus", "pci", "devices", address, "net", name))
        elif relative == os.path.join("bus", "pci", "drivers_probe"):
            address = text
            if self.driver(address) is not None:
                return
            override = self.read("bus", "pci", "devices", address, "driver_override")
            driver = override or self.natural_driver.get(address)
            if (
                driver
                and driver not in self.refuse
                and self.exists("bus", "pci", "drivers", driver)
            ):
                bind(self, address, driver)


def bind(sysfs: Sysfs, address: str, driver: str) -> None:
    os.symlink(
        os.path.join("..", "..", "drivers", driver),
        sysfs.path("bus", "pci", "devices", address, "driver"),
    )
    if driver in ("ixgbe", "igb"):
        index = int(address[-1])
        os.makedirs(sysfs.path("bus", "pci", "devices", address, "net", f"ixfake{index}"))


def make_device(root, address, *, group, vendor="0x8086", device="0x10fb", cls="0x020000"):
    dev = root / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    for name, value in (("vendor", vendor), ("device", device), ("class", cls)):
        (dev / name).write_text(value + "\n")
    (dev / "driver_override").write_text("(null)\n")
    if group is not None:
        members = root / "kernel" / "iommu_groups" / str(group) / "devices"
        members.mkdir(parents=True, exist_ok=True)
        (dev / "iommu_group").symlink_to(root / "kernel" / "iommu_groups" / str(group))
        (members / address).symlink_to(dev)
