"""The daemon on real VFIO devices: `ixyd` takes the guest's two igb ports from
the kernel's igb driver, `ixyd-ctl` sees them running with the link up at 1000 Mb/s,
frames generated on one port are reflected by the other through the data path, and
SIGTERM stops it cleanly, giving both ports back to igb, without a DMAR fault.

The scenario (scenarios/daemon_vfio.py) checks everything itself and prints a JSON summary
as its last line; this test asserts its exit code and the summary."""

from __future__ import annotations

import json

import pytest
from harness import GUEST_PYTHON, IGB_PORTS, SCENARIOS, VmHost

pytestmark = pytest.mark.vm

SCENARIO = [GUEST_PYTHON, str(SCENARIOS / "daemon_vfio.py")]
(BDF_A, MAC_A), (BDF_B, MAC_B) = ((port.bdf, port.mac) for port in IGB_PORTS)


def summary_of(result) -> dict:
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the scenario output:\n{result.output[-3000:]}"
    return json.loads(lines[-1])


def test_ixyd_runs_igb_ports_over_vfio_and_gives_them_back(vm: VmHost):
    result = vm.run(SCENARIO, timeout=180, with_igb_driver=True)
    summary = summary_of(result)
    assert result.returncode == 0 and summary["ok"], (summary.get("error"), result.output[-4000:])

    assert summary["ports_by_mac"] == {MAC_A: BDF_A, MAC_B: BDF_B}
    on_igb = {"driver": "igb"}
    for when in ("before", "after"):  # taken from igb, given back with a netdev
        for bdf in (BDF_A, BDF_B):
            assert summary[when][bdf].items() >= on_igb.items() and summary[when][bdf]["netdevs"]

    status = summary["status"]
    assert status["state"] == "running" and status["ports"] == [BDF_A, BDF_B]
    assert status["workers"] == 2
    ports = summary["ports"]
    assert {ports[BDF_A]["mac"], ports[BDF_B]["mac"]} == {MAC_A, MAC_B}
    assert all(p["driver"] == "igb" and p["backend"] == "vfio" for p in ports.values())
    assert ports[BDF_A]["forward"] == {"mode": "port", "to": BDF_B}
    assert ports[BDF_B]["forward"] == {"mode": "port", "to": BDF_A}
    assert summary["link"] == {BDF_A: [True, 1000], BDF_B: [True, 1000]}

    n = summary["generate_count"]
    a, b = summary["delta"][BDF_A], summary["delta"][BDF_B]
    assert a["generated"] == a["tx_packets"] == a["tx_good_packets"] == n
    assert b["rx_packets"] == b["rx_good_packets"] == b["forwarded"] == b["tx_packets"] == n
    assert a["rx_packets"] == a["dropped_by_mode"] == n  # reflected back, dropped in generate
    assert a["rx_no_descriptor"] == b["rx_no_descriptor"] == 0
    assert a["drop_tx_full"] == b["drop_tx_full"] == 0

    assert summary["exit_status"] == 0
    assert summary["timings"]["stop_s"] < 10
    assert summary["socket_after_exit"] is False
    assert summary["daemon_log_errors"] == []  # e.g. no CancelledError at shutdown
    assert summary["dmar_faults"] == []
    assert not [line for line in result.dmesg.splitlines() if "fault addr" in line]
