"""The igb driver on QEMU's 82576 model through the real kernel VFIO path, in a guest with
a virtual Intel IOMMU (tests/vm/harness.py): both ports up with IgbPort, sequence-numbered
frames A -> B and B -> A through the C data path with no loss, the checksum hazard of the
shared data path shown and avoided, MAC counters matching, RSS spreading flows after a
re-init, no DMAR fault. Both with the guest's memory fragmented on purpose, where QEMU's
igb loses every TX frame whose buffer crosses into a non-adjacent 4 KiB page, so the
guest's hugepages (harness.GUEST_HUGEPAGES) are what keeps the runs lossless
(docs/vm-guest-dma.md).

The scenarios (scenarios/igb_forward.py, scenarios/tx_page_crossing.py) check everything
themselves and print a JSON summary as their last line; the tests assert their exit code
and the summary."""

from __future__ import annotations

import json

import pytest
from harness import GUEST_PYTHON, IGB_PORTS, SCENARIOS, VmHost

pytestmark = pytest.mark.vm

FRAMES = 20000  # per direction
SCENARIO = [GUEST_PYTHON, str(SCENARIOS / "igb_forward.py")]
PAGE_CROSSING = [GUEST_PYTHON, str(SCENARIOS / "tx_page_crossing.py")]
HUGEPAGE, PAGE = 2 << 20, 4 << 10
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

    assert summary["fragmented_pages"] > 0
    assert summary["dma_page_sizes"] == [HUGEPAGE]  # no fallback to 4 KiB pages
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


def test_igb_tx_loses_frames_crossing_into_non_adjacent_pages_unless_dma_is_in_hugepages(
    vm: VmHost,
):
    # one boot, guest memory fragmented, 1,024 frames of 1,514 bytes per round
    result = vm.run(PAGE_CROSSING, timeout=420, env={"FRAMES": "1024"})
    summary = summary_of(result)
    assert result.returncode == 0 and summary["ok"], (summary.get("error"), result.output[-3000:])
    assert summary["fragmented_pages"] > 0

    # DMA memory in 4 KiB pages: QEMU drops exactly the frames whose buffer runs into a
    # page that is not the next guest-physical frame, and its MAC does not count them
    small = summary["4k"]
    assert small["dma_page_sizes"] == [PAGE]
    assert small["crossing_into_non_adjacent_page"] > 0
    assert small["lost"] == small["crossing_into_non_adjacent_page"]
    assert small["lost_inside_one_page"] == 0
    assert small["tx_good_packets"] == small["received"] == small["frames"] - small["lost"]

    # ixyd's default, with the hugepages the harness reserves: the same frames cross pages,
    # none is lost
    huge = summary["hugepages"]
    assert huge["dma_page_sizes"] == [HUGEPAGE]
    assert huge["crossing_page"] > 0
    assert huge["lost"] == 0 and huge["received"] == huge["frames"]
    assert summary["dmar_faults"] == []
