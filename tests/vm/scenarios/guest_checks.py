"""What the guest scenarios share (stdlib only; `import guest_checks` from this directory).

Two styles of scenario use it: the ixyd ones (daemon_vfio, systemd_vfio) stop at the first
failed `check(condition, message)` (CheckFailed) and log `step`s; the VFIO ones
(vfio_backend, vfio_not_viable) record every named check in a `Report` and go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

DMAR_FAULT_MARKERS = ("DMAR: [DMA", "DMAR: DRHD: handling fault", "fault addr")
T0 = time.monotonic()


def step(text: str) -> None:
    """A progress line on stderr, stamped with the seconds since the scenario began."""
    print(f"[{time.monotonic() - T0:6.2f}] {text}", file=sys.stderr, flush=True)


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    """Poll condition() until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def netdevs(bdf: str) -> list[str]:
    """The kernel interfaces of a PCI function (none while it is off its kernel driver)."""
    net = Path("/sys/bus/pci/devices") / bdf / "net"
    return sorted(os.listdir(net)) if net.is_dir() else []


def dmar_faults() -> list[str]:
    """The IOMMU fault lines in the kernel log: a DMA outside what VFIO mapped."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [line for line in log.splitlines() if any(m in line for m in DMAR_FAULT_MARKERS)]


def run_and_report(
    summary: dict, body: Callable[[], None], after: Callable[[], None] | None = None
) -> int:
    """Run a scenario `body` that fills `summary`, then `after` (logs to attach), and print
    the summary as the JSON line the host reads: ok, and on failure the error (the
    traceback goes to stderr), and how long it took. Returns the exit code."""
    started = time.monotonic()
    try:
        body()
        summary["ok"] = True
    except Exception as exc:  # every failure as JSON, the traceback on stderr
        traceback.print_exc()
        summary["ok"] = False
        summary["error"] = f"{type(exc).__name__}: {exc}"
    if after is not None:
        after()
    summary["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["ok"] else 1


class Report:
    """Named checks that do not stop the scenario, and timings, for its JSON summary."""

    def __init__(self) -> None:
        self.summary: dict = {"checks": {}, "timings_ms": {}}
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail=None) -> None:
        self.summary["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failures.append(name)

    def timed(self, name: str) -> _Timed:
        """`with report.timed("open"):` records how long the block took, in ms."""
        return _Timed(self.summary["timings_ms"], name)


class _Timed:
    def __init__(self, into: dict, name: str):
        self.into, self.name = into, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.name] = round((time.perf_counter() - self.start) * 1000, 2)
