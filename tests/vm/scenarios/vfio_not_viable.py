"""Guest scenario: an IOMMU group that is not viable, through the real kernel VFIO path.

Runs as root in the test guest booted with topology="shared-group" and the kernel's igb
driver loaded (tests/vm/harness.py): both igb functions sit behind one pcie-pci-bridge,
so they share one IOMMU group, and igb is bound to both. Steps:

 1. find both ports and their MACs; check that they share one IOMMU group;
 2. ixyd.pci.bind_vfio(first port) refuses, naming the other function and its driver,
    and changes nothing (both still on igb, interfaces still there);
 3. bind the first port to vfio-pci by hand (driver_override + drivers_probe), leaving the
    other on igb, which bind_vfio would not do: the group is now not viable;
 4. VfioContainer() + VfioDevice.open(first port) raises GroupNotViableError naming the
    other function, its driver and the fix; the container keeps no group open;
 5. ixyd.pci.bind_vfio_group(first port) binds the rest of the group to vfio-pci;
 6. now both functions open in one container (one group), BAR0 answers with each MAC;
 7. close and release both: igb takes them back.

Prints one line `VFIO_NOT_VIABLE_RESULT <json>` at the end; exits 0 when every check
passed, 1 when a check failed, 2 on an unexpected exception.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest_pci  # noqa: E402  (after the path setup above)
from guest_checks import Report  # noqa: E402
from guest_pci import mac_from_bar, vfio_fds  # noqa: E402

from ixyd import pci  # noqa: E402
from ixyd.vfio import GroupNotViableError, VfioContainer, VfioDevice, VfioError  # noqa: E402

MARKER = "VFIO_NOT_VIABLE_RESULT"
FIRST_MAC = "52:54:00:00:00:01"  # the port bound by hand; harness IGB_PORTS_SHARED_GROUP
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")

report = Report()
summary, failures, check, timed = report.summary, report.failures, report.check, report.timed


def state(bdfs: list[str]) -> dict:
    """Driver, driver_override and interfaces of each function."""
    sysfs = pci.Sysfs()
    return {
        bdf: {
            "driver": sysfs.driver(bdf),
            "override": sysfs.read("bus", "pci", "devices", bdf, "driver_override"),
            "netdevs": sysfs.netdevs(bdf),
        }
        for bdf in bdfs
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)

    # 1. the ports, and the group they share
    ports = guest_pci.igb_addresses_in_guest()  # MAC -> BDF
    summary["ports"] = {bdf: mac for mac, bdf in ports.items()}
    check("two_igb_ports", len(ports) == 2, ports)
    first = ports[FIRST_MAC]
    other = next(bdf for mac, bdf in ports.items() if mac != FIRST_MAC)
    summary["first"], summary["other"] = first, other
    group = guest_pci.iommu_group(first)
    members = sorted(os.listdir(IOMMU_GROUPS / str(group) / "devices"))
    summary["group"], summary["group_members"] = group, members
    check(
        "shared_group",
        guest_pci.iommu_group(other) == group and {first, other} <= set(members),
        {"group": group, "members": members},
    )
    before = state([first, other])
    summary["before"] = before
    check(
        "igb_bound_to_both",
        all(s["driver"] == "igb" and s["netdevs"] for s in before.values()),
        before,
    )

    # 2. bind_vfio refuses a function whose group mate is on a kernel driver
    try:
        with timed("bind_vfio refused"):
            pci.bind_vfio(first)
        check("bind_vfio_refused", False, f"bind_vfio took {first} with {other} on igb")
    except pci.PciBindError as exc:
        text = str(exc)
        summary["bind_vfio_message"] = text
        check(
            "bind_vfio_refused",
            type(exc) is pci.PciBindError
            and f"IOMMU group {group}" in text
            and f"{other} (bound to igb)" in text
            and "bind_vfio_group" in text,
            text,
        )
    after_refusal = state([first, other])
    check("refusal_changed_nothing", after_refusal == before, after_refusal)

    # 3. by hand, as a user bypassing ixyd.pci would: only the first function to vfio-pci
    with timed("bind by hand"):
        guest_pci.bind_to_vfio_pci(first)
    half = state([first, other])
    summary["half_bound"] = half
    check(
        "half_bound_by_hand",
        half[first]["driver"] == "vfio-pci"
        and half[other]["driver"] == "igb"
        and os.path.exists(f"/dev/vfio/{group}"),
        half,
    )

    # 4. VFIO sees a group that is not viable, and says why
    with timed("open refused"), VfioContainer() as container:
        try:
            VfioDevice.open(first, container)
            check("open_not_viable", False, f"opened {first} with {other} on igb")
        except GroupNotViableError as exc:
            text = str(exc)
            summary["not_viable_message"] = text
            check(
                "open_not_viable",
                f"IOMMU group {group} is not viable" in text
                and f"{other} is bound to igb" in text
                and "vfio-pci" in text
                and "bind_vfio_group" in text,
                text,
            )
        except VfioError as exc:
            check("open_not_viable", False, f"{type(exc).__name__}: {exc}")
        check("no_group_attached", container.groups == [], container.groups)
        check("group_fd_closed", vfio_fds() == ["/dev/vfio/vfio"], vfio_fds())
    check("container_closed", vfio_fds() == [], vfio_fds())
    check("still_half_bound", state([first, other]) == half, state([first, other]))

    # bind_vfio on a function already on vfio-pci whose group mate is still on igb must
    # refuse too (the group is no more usable than before), and change nothing.
    try:
        binding = pci.bind_vfio(first)
        check("bind_vfio_refuses_half_bound_group", False, f"returned {binding}")
    except pci.PciBindError as exc:
        check(
            "bind_vfio_refuses_half_bound_group", other in str(exc) and "igb" in str(exc), str(exc)
        )
    check("half_bound_unchanged", state([first, other]) == half, state([first, other]))

    # 5. bind the whole group
    with timed("bind_vfio_group"):
        bindings = pci.bind_vfio_group(first)
    bound = state([first, other])
    check(
        "bind_vfio_group",
        [b.address for b in bindings] == [first, other]
        and all(s["driver"] == "vfio-pci" for s in bound.values())
        and {b.address: b.original_driver for b in bindings}[other] == "igb",
        {
            "bindings": [
                {"address": b.address, "original": b.original_driver, "group": b.iommu_group}
                for b in bindings
            ],
            "state": bound,
        },
    )

    # 6. now the group is viable: both functions open through one container
    with timed("open both"), VfioContainer() as container:
        devices = {bdf: VfioDevice.open(bdf, container) for bdf in (first, other)}
        macs = {bdf: mac_from_bar(dev) for bdf, dev in devices.items()}
        check(
            "open_viable",
            container.groups == [group]
            and all(
                (d.ids.vendor_id, d.ids.device_id) == (0x8086, 0x10C9) for d in devices.values()
            )
            and macs == summary["ports"],
            {"groups": container.groups, "bar0_macs": macs},
        )
    check("closed", vfio_fds() == [] and all(d.closed for d in devices.values()), vfio_fds())

    # 7. back to igb
    with timed("release both"):
        for bdf in (first, other):
            pci.release(bdf)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = state([first, other])
        if all(s["driver"] == "igb" and s["netdevs"] for s in after.values()):
            break
        time.sleep(0.05)
    check(
        "released_to_igb",
        all(
            s["driver"] == "igb" and s["netdevs"] and s["override"] == "(null)"
            for s in after.values()
        ),
        after,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        rc = main()
    except Exception as exc:  # report, never hang the guest
        traceback.print_exc()
        summary["error"] = f"{type(exc).__name__}: {exc}"
        rc = 2
    summary["failures"] = failures
    print(f"{MARKER} {json.dumps(summary, sort_keys=True)}", flush=True)
    sys.exit(rc)
