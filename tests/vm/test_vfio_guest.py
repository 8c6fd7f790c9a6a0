"""ixyd's VFIO backend (ixyd.pci binding, ixyd.vfio container and devices) against the real
kernel: vfio-pci and vfio_iommu_type1 in a guest with QEMU's VT-d and two igb functions.

scenarios/vfio_backend.py does the work and checks each step itself; it prints one line
`VFIO_SCENARIO_RESULT <json>`. These tests assert its exit code and that summary, and
cross-check the guest kernel's log. Run twice: with the kernel's igb driver bound first
(bind takes the ports from igb, release gives them back and the interfaces reappear) and
with the ports unbound. scenarios/vfio_not_viable.py (topology="shared-group": both igb in
one IOMMU group) checks the errors for a group that is only half on vfio-pci.
"""

from __future__ import annotations

import json

import pytest
from harness import GUEST_PYTHON, IGB_PORTS, IGB_PORTS_SHARED_GROUP, SCENARIOS, VmHost

pytestmark = pytest.mark.vm

SCENARIO = [GUEST_PYTHON, str(SCENARIOS / "vfio_backend.py")]
MARKER = "VFIO_SCENARIO_RESULT "
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
PER_DEVICE_CHECKS = (
    "bound",
    "ids",
    "mac_via_bar0",
    "ctrl_status",
    "bus_master",
    "pcie_capability",
    "msix_info",
    "reset_supported",
    "status_after_reset",
    "released",
)
CONTAINER_CHECKS = (
    "two_igb_ports",
    "unbound_device_refused",
    "msi_window_excluded",
    "type1v2",
    "dma_iovas_in_valid_ranges",
    "dma_iova_is_not_va",
    "dma_mappings_tracked",
    "msi_window_map_refused",
    "dma_unmap_on_free",
    "group_has_one_owner",
    "memlock_limit_explained",
    "no_mappings_left",
    "all_devices_closed",
    "no_vfio_fds_left",
)


def run_scenario(vm: VmHost, with_igb_driver: bool):
    # The igb run is slow mostly because importing pyroute2 over 9p takes 8-12 s in the guest.
    result = vm.run(SCENARIO, timeout=150, with_igb_driver=with_igb_driver)
    lines = [line for line in result.output.splitlines() if line.startswith(MARKER)]
    assert lines, f"no summary line in the scenario output:\n{result.output[-4000:]}"
    summary = json.loads(lines[-1][len(MARKER) :])
    assert result.returncode == 0 and not summary["failures"], (
        summary.get("error"),
        summary["failures"],
        result.output[-4000:],
    )
    return result, summary


def assert_common(result, summary) -> None:
    expected_ports = {port.bdf: port.mac for port in IGB_PORTS}
    assert summary["ports"] == expected_ports
    checks = summary["checks"]
    names = list(CONTAINER_CHECKS) + [
        f"{check} {bdf}" for check in PER_DEVICE_CHECKS for bdf in expected_ports
    ]
    missing = [name for name in names if name not in checks]
    assert not missing, f"scenario skipped checks: {missing}"
    assert all(checks[name]["ok"] for name in names)

    for bdf, mac in expected_ports.items():
        assert checks[f"mac_via_bar0 {bdf}"]["detail"]["bar0"] == mac  # BAR0 mapped right
        assert checks[f"ids {bdf}"]["detail"]["ids"] == "8086:10c9"
        assert checks[f"bus_master {bdf}"]["detail"] == {"command_on": "0x7", "command_off": "0x3"}
    ranges = [(int(a, 16), int(b, 16)) for a, b in summary["valid_iova_ranges"]]
    assert not any(a <= MSI_WINDOW[1] and MSI_WINDOW[0] <= b for a, b in ranges)
    assert len(summary["groups"]) == 2  # one container, both groups

    # The memlock refusal was the kernel's own, for the reason the message gives.
    assert "RLIMIT_MEMLOCK (1048576) exceeded" in result.dmesg
    assert "DMAR: [DMA" not in result.dmesg and "handling fault" not in result.dmesg


def test_vfio_backend_takes_ports_from_igb_and_gives_them_back(vm: VmHost):
    result, summary = run_scenario(vm, with_igb_driver=True)
    assert_common(result, summary)
    checks = summary["checks"]
    assert checks["busy_interface_refused"]["ok"]
    assert "192.0.2.1/24" in checks["busy_interface_refused"]["detail"]
    for port in IGB_PORTS:
        bound = checks[f"bound {port.bdf}"]["detail"]
        assert bound["original"] == "igb" and len(bound["netdevs"]) == 1
        released = checks[f"released {port.bdf}"]["detail"]
        assert released["driver"] == "igb" and len(released["netdevs"]) == 1


def test_vfio_backend_with_unbound_ports(vm: VmHost):
    result, summary = run_scenario(vm, with_igb_driver=False)
    assert_common(result, summary)
    for port in IGB_PORTS:
        assert summary["checks"][f"bound {port.bdf}"]["detail"]["original"] is None
        assert summary["checks"][f"released {port.bdf}"]["detail"] is None  # no driver again


def test_vfio_group_not_viable_is_explained(vm: VmHost):
    """Both igb in one IOMMU group (topology="shared-group"), igb bound to both; only one
    put on vfio-pci by hand: opening it fails with GroupNotViableError naming the other
    function and its driver, bind_vfio refuses without touching anything, and
    bind_vfio_group makes the group usable."""
    result = vm.run(
        [GUEST_PYTHON, str(SCENARIOS / "vfio_not_viable.py")],
        timeout=120,
        with_igb_driver=True,
        topology="shared-group",
    )
    marker = "VFIO_NOT_VIABLE_RESULT "
    lines = [line for line in result.output.splitlines() if line.startswith(marker)]
    assert lines, f"no summary line in the scenario output:\n{result.output[-4000:]}"
    summary = json.loads(lines[-1][len(marker) :])
    assert result.returncode == 0 and not summary["failures"], (
        summary.get("error"),
        summary["failures"],
        result.output[-4000:],
    )
    checks = summary["checks"]
    names = (
        "two_igb_ports",
        "shared_group",
        "igb_bound_to_both",
        "bind_vfio_refused",
        "refusal_changed_nothing",
        "half_bound_by_hand",
        "open_not_viable",
        "no_group_attached",
        "group_fd_closed",
        "container_closed",
        "still_half_bound",
        "bind_vfio_group",
        "open_viable",
        "closed",
        "released_to_igb",
    )
    assert [name for name in names if not checks.get(name, {}).get("ok")] == []

    first, other = (port.bdf for port in IGB_PORTS_SHARED_GROUP)
    assert summary["ports"] == {port.bdf: port.mac for port in IGB_PORTS_SHARED_GROUP}
    assert (summary["first"], summary["other"]) == (first, other)
    group = summary["group"]
    assert {first, other} <= set(summary["group_members"])  # one group, the bridge with them

    # The exact words a user sees, from ixyd.vfio and ixyd.pci.
    assert summary["not_viable_message"] == (
        f"IOMMU group {group} is not viable: {other} is bound to igb; bind it to vfio-pci "
        f"(ixyd.pci.bind_vfio_group binds the whole group)"
    )
    refusal = summary["bind_vfio_message"]
    assert f"{first} shares IOMMU group {group} with {other} (bound to igb)" in refusal
    assert f"bind_vfio_group({first!r})" in refusal
    assert summary["checks"]["refusal_changed_nothing"]["detail"] == summary["before"]

    half = summary["half_bound"]
    assert half[first]["driver"] == "vfio-pci" and half[other]["driver"] == "igb"
    bindings = checks["bind_vfio_group"]["detail"]["bindings"]
    assert {b["address"]: b["original"] for b in bindings}[other] == "igb"
    assert checks["open_viable"]["detail"] == {"groups": [group], "bar0_macs": summary["ports"]}
    assert "DMAR: [DMA" not in result.dmesg and "handling fault" not in result.dmesg
