"""The igb driver on QEMU's 82576 model through the real kernel VFIO path, in a guest with
a virtual Intel IOMMU (tests/vm/harness.py): both ports up with IgbPort, sequence-numbered
frames A -> B and B -> A through the C data path with no loss, the checksum hazard of the
shared data path shown and avoided, MAC counters matching, RSS spreading flows after a
re-init, no DMAR fault.

The scenario (scenarios/igb_forward.py) checks everything itself and prints a JSON
summary as its last line; this test asserts its exit code and the summary."""

from __future__ import annotations

import json

import pytest
from harness import IGB_PORTS, SCENARIOS, VmHost

pytestmark = pytest.mark.vm

FRAMES = 20000  # per direction
SCENARIO = [".venv/bin/python", str(SCENARIOS / "igb_forward.py")]
MAC_A, MAC_B = (port.mac for port in IGB_PORTS)
RXCSUM_IPOFL_TUOFL = 0x300


def summary_of(result) -> dict:
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the scenario output:\n{result.output[-3000:]}"
    return json.loads(lines[-1])


def test_igb_ports_forward_both_ways_through_vfio_without_loss_or_dmar_faults(vm: VmHost):
    result = vm.run(SCENARIO, timeout=240, env={"IGB_FRAMES": str(FRAMES)})
    summary = summary_of(result)
    assert result.returncode == 0 and summary["ok"], (summary.get("error"), result.output[-3000:])

    assert summary["ids"] == ["8086:10c9", "8086:10c9"]
    assert summary["macs"] == [MAC_A, MAC_B]
    assert len(summary["iommu_groups"]) == 2  # one container, two groups
    assert summary["link"] == [[True, 1000], [True, 1000]]
    for direction in ("a_to_b", "b_to_a"):
        assert summary[direction]["frames"] == FRAMES
    sa, sb = summary["stats_a"], summary["stats_b"]
    assert sa["tx_good_packets"] == sb["rx_good_packets"] == FRAMES
    assert sb["tx_good_packets"] == sa["rx_good_packets"] == FRAMES
    assert sa["rx_no_descriptor"] == sb["rx_no_descriptor"] == 0

    hazard = summary["checksum_hazard"]
    assert hazard["rxcsum_by_driver"] & RXCSUM_IPOFL_TUOFL == 0
    assert hazard["offload_off_bad_checksum"] == {"delivered": 16, "dropped": 0}
    assert hazard["tuofl_on_bad_checksum"] == {"delivered": 16, "dropped": 0}  # L4E is not RXE
    assert hazard["tuofl_on_good_checksum"] == {"delivered": 16, "dropped": 0}

    rss = summary["rss"]  # port B re-initialised with 4 RX queues, RSS on
    assert rss["frames"] == sum(rss["per_queue"]) == 256 and all(rss["per_queue"])

    assert summary["bus_master_after_shutdown"] == [False, False]
    assert summary["dmar_faults"] == []  # after the clean run
    fault = summary["unmapped_iova"]  # then a descriptor at an unmapped IOVA
    assert fault["fault_lines"] and "0x7ff00000" in fault["fault_lines"][0]
    assert fault["received_zeros"] and fault["received_length"] > 60
    # the only DMA fault in the guest's whole log is the deliberate one
    addresses = [line for line in result.dmesg.splitlines() if "fault addr" in line]
    assert addresses and all("0x7ff00000" in line for line in addresses)
