"""ixyd under real systemd on real VFIO: in a guest booted with systemd as
init, `ixyd-host install` sets the host up, `systemctl start ixyd@<address>` binds both igb
ports to vfio-pci and runs the daemon as user ixyd, which forwards frames between the two
ports and serves the socket-activated control socket and the metrics endpoint;
`systemctl stop` gives both ports back to igb and leaves nothing behind.

The scenario (scenarios/systemd_vfio.py) checks everything itself and prints a JSON summary
as its last line; this test asserts its exit code and the summary, and shows the guest's
journal when something failed."""

from __future__ import annotations

import json

import pytest
from harness import GUEST_PYTHON, IGB_PORTS, SCENARIOS, GuestResult, VmHost

pytestmark = pytest.mark.vm

SCENARIO = [GUEST_PYTHON, str(SCENARIOS / "systemd_vfio.py")]
(BDF_A, MAC_A), (BDF_B, MAC_B) = ((port.bdf, port.mac) for port in IGB_PORTS)
UNIT = f"ixyd@{BDF_A}.service"
GENERATE_COUNT = 500  # scenarios/systemd_vfio.py
JOURNAL_TAIL = 150  # lines of the journal shown with a failure


def journal_tail(result: GuestResult) -> str:
    lines = result.journal.splitlines()
    return "\n".join(lines[-JOURNAL_TAIL:]) or "(no journal)"


def summary_of(result: GuestResult) -> dict:
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert lines, (
        f"no JSON summary in the scenario output:\n{result.output[-3000:]}\n"
        f"---- journal ----\n{journal_tail(result)}"
    )
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def run(vm: VmHost) -> tuple[GuestResult, dict]:
    result = vm.run(SCENARIO, timeout=300, with_igb_driver=True, init="systemd")
    return result, summary_of(result)


def explain(result: GuestResult, summary: dict) -> str:
    return (
        f"{summary.get('error')}\n---- scenario ----\n{result.output[-4000:]}\n"
        f"---- journal ----\n{journal_tail(result)}"
    )


def test_systemctl_start_runs_ixyd_unprivileged_on_vfio_and_stop_gives_ports_back(run):
    result, summary = run
    assert result.returncode == 0 and summary["ok"], explain(result, summary)

    assert summary["ports_by_mac"] == {MAC_A: BDF_A, MAC_B: BDF_B}
    assert summary["unit"] == UNIT
    assert summary["vfio_loaded_before_start"] is False  # the unit loads vfio-pci itself
    for when in ("before", "after"):  # on igb with a netdev before start and after stop
        for bdf in (BDF_A, BDF_B):
            assert summary[when][bdf]["driver"] == "igb" and summary[when][bdf]["netdevs"]

    # installed: accounts, directories, units; systemd reloaded
    assert any("daemon-reload" in line for line in summary["host_install"])
    uid, gid = summary["accounts"]["daemon"]
    assert uid != 0 and gid != 0
    assert "ixyd-ops" in summary["accounts"]["operator_groups"]

    # running: active, main process as user ixyd, devices on vfio-pci for group ixyd
    assert summary["running"]["ActiveState"] == "active"
    assert summary["running"]["NRestarts"] == "0"
    ids = summary["main_process"]
    assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4 and 0 not in ids["Groups"]
    assert summary["bound"] == {BDF_A: "vfio-pci", BDF_B: "vfio-pci"}
    assert all(node == [0, gid, "0o660"] for node in summary["vfio_nodes"].values())

    # control: socket-activated socket for group ixyd-ops; root and operator may read,
    # only root may change, an outsider may not connect
    socket = summary["control_socket"]
    assert socket == {"uid": 0, "group": "ixyd-ops", "mode": "0o660", "unit": "active"}
    assert summary["status"] == {
        "instance": BDF_A,
        "state": "running",
        "ports": [BDF_A, BDF_B],
        "workers": 2,
    }
    access = summary["access"]
    assert access["status"] == "running" and access["stats"] == sorted([BDF_A, BDF_B])
    assert access["set_forward"][0] == 4 and "permission denied" in access["set_forward"][1]
    assert access["outsider_status"][0] == 4

    # traffic: A generated, B got and reflected, A got the frames back
    counters = summary["counters"]
    a, b = counters[BDF_A], counters[BDF_B]
    assert a["generated"] == a["tx_packets"] == GENERATE_COUNT
    assert 0 < b["rx_packets"] <= GENERATE_COUNT
    assert 0 < b["forwarded"] == b["tx_packets"]
    assert 0 < a["rx_packets"] <= b["tx_packets"]

    # metrics: ixyd_ series, packet counters of both ports in both directions above 0
    metrics = summary["metrics"]
    assert summary["status_metrics"] == "http://127.0.0.1:19911/metrics"
    assert metrics["ixyd_series"] > 0
    for bdf in (BDF_A, BDF_B):
        assert metrics["packets"][bdf]["ixyd_receive_packets_total"] > 0
        assert metrics["packets"][bdf]["ixyd_transmit_packets_total"] > 0

    # stopped: cleanly, nothing left
    stopped = summary["stopped"]
    assert stopped["ActiveState"] == "inactive" and stopped["Result"] == "success"
    assert stopped["socket_unit"] == "inactive"
    assert summary["leftovers"] == {
        "socket": False,
        "group_records": [],
        "vfio_nodes": [],
        "processes": [],
    }
    assert summary["dmar_faults"] == []
    assert not [line for line in result.dmesg.splitlines() if "fault addr" in line]
    # the unit's warnings and errors, start to stop: only the refused change
    assert summary["unit_warnings"] and all(
        "refused 'set_forward'" in line for line in summary["unit_warnings"]
    ), summary["unit_warnings"]


def test_journal_shows_the_unit_lifecycle(run):
    """The journal came back from the guest and tells the story: bind as root, daemon up,
    the refused change, stop, give-back."""
    result, summary = run
    assert result.journal, "no journal from the guest"
    ixyd_lines = [line for line in result.journal.splitlines() if "ixyd" in line]
    for expected in (
        f"{BDF_A}: on vfio-pci (was igb)",
        f"instance {BDF_A} running: 2 ports, 2 workers",
        "control: refused 'set_forward'",
        f"{BDF_B}: back on igb",
        f"Stopped {UNIT}",
    ):
        assert any(expected in line for line in ixyd_lines), (expected, explain(result, summary))
    assert not [line for line in ixyd_lines if "Traceback" in line or " ERROR " in line]
