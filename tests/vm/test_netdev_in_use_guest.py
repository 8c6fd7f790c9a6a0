"""An igb port whose interface is in use is not taken, wherever that interface is:
stacked under a VLAN, a bond, a bridge or a macvlan in another namespace, or
moved itself into another network namespace (named, or only a process's) with an address
there, where this namespace's sysfs no longer lists it. scenarios/netdev_in_use.py does
the work with the guest kernel's igb, 8021q, bonding, bridge and macvlan and prints one
line `NETDEV_IN_USE_RESULT <json>`; this test asserts its exit code and every check."""

from __future__ import annotations

import json

import pytest
from harness import GUEST_PYTHON, SCENARIOS, VmHost

pytestmark = pytest.mark.vm

MARKER = "NETDEV_IN_USE_RESULT "
CHECKS = (
    "on_igb",
    "idle_accepted",
    "vlan_lower_refused",
    "bond_slave_refused",
    "bridge_port_refused",
    "macvlan_in_other_namespace_refused",
    "idle_again",
    "gone_from_sysfs_net",
    "moved_interface_refused",
    "prepare_exits_1_and_leaves_it_on_igb",
    "interface_in_unnamed_namespace_refused",
    "idle_moved_interface_taken",
    "released_to_igb",
)


def test_an_igb_port_in_use_by_stacking_or_from_another_namespace_is_refused(vm: VmHost):
    result = vm.run(
        [GUEST_PYTHON, str(SCENARIOS / "netdev_in_use.py")],
        timeout=300,
        with_igb_driver=True,
        env={"IXT_KROOT": str(vm.kroot)},
    )
    lines = [line for line in result.output.splitlines() if line.startswith(MARKER)]
    assert lines, f"no summary line in the scenario output:\n{result.output[-4000:]}"
    summary = json.loads(lines[-1][len(MARKER) :])
    failed = {name: summary["checks"].get(name) for name in summary["failures"]}
    assert result.returncode == 0 and not failed, (summary.get("error"), failed)
    assert [name for name in CHECKS if summary["checks"].get(name, {}).get("ok")] == list(CHECKS)
