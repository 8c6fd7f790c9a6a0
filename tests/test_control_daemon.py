"""The control socket of a real `ixyd` process (issue 12): what its configuration and its
state directory change about what callers may do and are told. Needs root (a mount
namespace for the state directory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_service_e2e import RATE, Daemon

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
