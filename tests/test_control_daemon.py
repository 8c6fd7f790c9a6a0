"""The control socket of a real `ixyd` process: what its configuration and its
state directory change about what callers may do and are told. Needs root (a mount
namespace for the state directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hosttools import RATE, Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FAULTY_CONFIG = """\
instance = "faulty"
fault_injection = true

[[port]]
address = "card.0"
forward = {mode = "port", to = "card.1"}

[[port]]
address = "card.1"
forward = {mode = "port", to = "card.0"}

[model_traffic]
rate = 1000
"""


def test_inject_fault_is_off_unless_the_configuration_turns_it_on(run_dir, daemons):
    """By default the method does not exist: neither `ixyd-ctl debug` nor a raw call can
    hang a worker or unplug a port, and the traffic goes on. `fault_injection = true`
    serves it (its start is logged as a warning)."""
    demo = Daemon(run_dir, ["--demo", "--demo-rate", str(RATE), "--demo-frames", "0"])
    daemons.append(demo)
    refused = demo.ctl("debug", "remove-port", "--port", "demo.1", check=False)
    assert refused.returncode == 1
    assert "has fault injection off: set fault_injection = true" in refused.stderr
    raw = demo.ctl("call", "inject_fault", '{"fault": "stall", "worker": 0}', check=False)
    assert raw.returncode == 1 and "no method 'inject_fault'" in raw.stderr
    assert [p["present"] for p in demo.json("ports")["ports"]] == [True, True]
    before = demo.counters()["demo.1"]["tx_packets"]
    deadline = time.monotonic() + 30
    while demo.counters()["demo.1"]["tx_packets"] <= before:  # every worker still forwards
        assert time.monotonic() < deadline, "demo.1 stopped sending"
        time.sleep(0.1)

    config = Path(run_dir, "faulty.toml")
    config.write_text(FAULTY_CONFIG)
    faulty = Daemon(run_dir, ["faulty", "--config", str(config)], "faulty")
    daemons.append(faulty)
    assert "card.1 unplugged" in faulty.ctl("debug", "remove-port", "--port", "card.1").stdout
    assert [p["present"] for p in faulty.json("ports")["ports"]] == [True, False]
    assert faulty.terminate() == 0
    assert "fault injection is on" in faulty.log


# The state directory as the daemon sees it in its own mount namespace: read-only (as
# outside ReadWritePaths= under systemd), or a file system with no space left.
STATE_MOUNTS = {
    "read-only": ('mount --bind "$STATE" "$STATE" && mount -o remount,bind,ro "$STATE"'),
    "full": (
        'mount -t tmpfs -o size=64k tmpfs "$STATE" && '
        '{ dd if=/dev/zero of="$STATE/filler" bs=4k 2>/dev/null || true; }'
    ),
}
STATE_ERRORS = {"read-only": "Read-only file system", "full": "No space left on device"}


class DaemonWithStateMount(Daemon):
    """A Daemon whose state directory `state_dir` is mounted by `mount` (sh) in a mount
    namespace of its own."""

    def __init__(self, run_dir: str, state_dir: str, mount: str):
        self.run_dir, self.instance = run_dir, "demo"
        self.socket = Path(run_dir) / "demo.sock"
        self.env = {**os.environ, "IXYD_RUN_DIR": run_dir, "STATE": state_dir}
        self.env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
            + [f'{mount} && exec "$@"', "sh", sys.executable, "-m", "ixyd.service"]
            + ["--demo", "--demo-rate", str(RATE), "--run-dir", run_dir, "--state-dir", state_dir],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log = ""
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"ixyd did not start: {self.proc.communicate()[0]}")
            time.sleep(0.05)


@pytest.mark.parametrize("state", ["read-only", "full"])
def test_a_change_the_state_directory_cannot_keep_is_made_with_a_warning(run_dir, daemons, state):
    """The change takes effect (forwarding is not held hostage by a disk), and both the
    reply and ixyd-ctl say that a restart will undo it."""
    state_dir = os.path.join(run_dir, "state")
    os.mkdir(state_dir)
    d = DaemonWithStateMount(run_dir, state_dir, STATE_MOUNTS[state])
    daemons.append(d)
    state_file = os.path.join(state_dir, "demo.json")
    changed = d.ctl("set-forward", "demo.0", "drop")
    assert changed.stdout.strip() == "demo.0: forwarding drop"
    expected = (
        f"ixyd-ctl: warning: demo.0: the change is in effect but not saved: cannot write "
        f"{state_file} ({STATE_ERRORS[state]}); a restart will undo it"
    )
    assert changed.stderr.strip() == expected
    assert d.json("get-forward", "demo.0")["ports"][0]["forward"] == {"mode": "drop"}
    promisc = json.loads(d.ctl("--json", "set-promisc", "demo.1", "off").stdout)
    assert promisc["promisc"] is False
    assert promisc["warnings"] == [expected.replace("ixyd-ctl: warning: demo.0", "demo.1")]
    assert not os.path.exists(state_file)  # outside the daemon's namespace: never written
    assert d.terminate() == 0
    assert "cannot write the state file" in d.log
