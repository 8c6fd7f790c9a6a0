"""Helpers the host-side tests share: waiting for a condition, network namespaces with
commands and Python scripts run inside them, and running an action as another user.
Imported by name (pytest puts tests/ on sys.path), like test_pci's fake kernel."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

NOBODY = 65534


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
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
