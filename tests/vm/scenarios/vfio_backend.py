"""Guest scenario: ixyd's VFIO backend (ixyd.pci, ixyd.vfio) on a real kernel and vIOMMU.

Runs as root inside the test guest (tests/vm/harness.py): two igb functions (8086:10c9),
each alone in its IOMMU group, QEMU's VT-d with DMA and interrupt remapping. Steps:

 1. find both ports and their MACs before touching them;
 2. opening a port before binding it fails with "bind it first"; (igb loaded) a port
    whose interface is up with an address is not taken;
 3. bind both with ixyd.pci.bind_vfio;
 4. one VfioContainer, both VfioDevices: IDs from config space, MAC from RAL0/RAH0 through
    BAR0, CTRL/STATUS, bus master on/off read back, VFIO reset, MSI-X info;
 5. DMA memory: IOVAs inside the kernel's valid ranges (which exclude the MSI window) and
    different from the host addresses; a map inside the MSI window is refused;
 6. a second container cannot take a group that is already open;
 7. with CAP_IPC_LOCK dropped and a low RLIMIT_MEMLOCK, MAP_DMA fails with the memlock
    explanation;
 8. close everything: no mapping and no /dev/vfio fd left;
 9. release both ports; with igb loaded their interfaces come back.

Prints one line `VFIO_SCENARIO_RESULT <json>` at the end; exits 0 when every check passed,
1 when a check failed, 2 on an unexpected exception.
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest_pci  # noqa: E402  (after the path setup above)
from guest_checks import Report  # noqa: E402
from guest_memory import kernel_page_size  # noqa: E402
from guest_pci import mac_from_bar, vfio_fds  # noqa: E402
from ixyd._vfio import lib  # noqa: E402

from ixyd import pci  # noqa: E402
from ixyd.dma import HostMemory  # noqa: E402
from ixyd.vfio import (  # noqa: E402
    MemlockLimitError,
    VfioContainer,
    VfioDevice,
    VfioDmaError,
    VfioError,
)

MARKER = "VFIO_SCENARIO_RESULT"
# 82576 registers (Linux e1000_regs.h): E1000_CTRL, E1000_STATUS (RAL0/RAH0: guest_pci)
CTRL, STATUS = 0x00000, 0x00008
ALL_ONES = 0xFFFFFFFF
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # x86 interrupt address range
CAP_IPC_LOCK = 14  # <linux/capability.h>
LINUX_CAPABILITY_VERSION_3 = 0x20080522
TEST_ADDRESS = ("192.0.2.1", 24)  # TEST-NET-1

report = Report()
summary, failures, check, timed = report.summary, report.failures, report.check, report.timed


def drop_ipc_lock() -> None:
    """Clear CAP_IPC_LOCK from the effective set: root bypasses RLIMIT_MEMLOCK with it."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~(1 << CAP_IPC_LOCK)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def interface_in_use_is_refused(bdf: str, ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=TEST_ADDRESS[0], prefixlen=TEST_ADDRESS[1])
        ipr.link("set", index=index, state="up")
    try:
        pci.bind_vfio(bdf)
        check("busy_interface_refused", False, f"bind_vfio took {bdf} while {ifname} was busy")
    except pci.NetdevInUseError as exc:
        text = str(exc)
        check(
            "busy_interface_refused",
            ifname in text and f"{TEST_ADDRESS[0]}/{TEST_ADDRESS[1]}" in text,
            text,
        )
    check("busy_interface_untouched", pci.Sysfs().driver(bdf) == "igb", pci.Sysfs().driver(bdf))
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("del", index=index, address=TEST_ADDRESS[0], prefixlen=TEST_ADDRESS[1])
        # left up: bind_vfio must set it down itself


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    sysfs = pci.Sysfs()
    igb_loaded = sysfs.exists("bus", "pci", "drivers", "igb")
    summary["igb_loaded"] = igb_loaded

    # 1. the ports, identified by MAC before anything is bound to vfio-pci
    ports = guest_pci.igb_addresses_in_guest()  # MAC -> BDF
    by_bdf = {bdf: mac for mac, bdf in ports.items()}
    summary["ports"] = by_bdf
    check("two_igb_ports", len(ports) == 2, ports)
    bdfs = sorted(by_bdf)
    before = {bdf: (sysfs.driver(bdf), sysfs.netdevs(bdf)) for bdf in bdfs}
    summary["before"] = before

    # 2. a port not yet on vfio-pci cannot be opened; one in use is not taken
    with VfioContainer() as container:
        try:
            VfioDevice.open(bdfs[0], container)
            check("unbound_device_refused", False, f"opened {bdfs[0]} before binding it")
        except VfioError as exc:
            check("unbound_device_refused", "bind it first" in str(exc), str(exc))
    if igb_loaded:
        first = bdfs[0]
        interface_in_use_is_refused(first, before[first][1][0])

    # 3. bind
    for bdf in bdfs:
        with timed(f"bind_vfio {bdf}"):
            binding = pci.bind_vfio(bdf)
        check(
            f"bound {bdf}",
            sysfs.driver(bdf) == "vfio-pci" and binding.original_driver == before[bdf][0],
            {
                "driver": sysfs.driver(bdf),
                "original": binding.original_driver,
                "group": binding.iommu_group,
                "netdevs": list(binding.netdevs),
            },
        )

    # 4. container and devices
    with timed("container open"):
        container = VfioContainer()
    devices = {}
    for bdf in bdfs:
        with timed(f"device open {bdf}"):
            devices[bdf] = VfioDevice.open(bdf, container)
    summary["groups"] = container.groups
    summary["iommu_type"] = container.iommu_type
    ranges = container.valid_iova_ranges()
    summary["valid_iova_ranges"] = [[hex(a), hex(b)] for a, b in ranges]
    summary["iova_pgsizes"] = hex(container.iova_pgsizes)
    check(
        "msi_window_excluded",
        not any(a <= MSI_WINDOW[1] and MSI_WINDOW[0] <= b for a, b in ranges),
        summary["valid_iova_ranges"],
    )
    check("type1v2", container.iommu_type == lib.VFIO_TYPE1v2_IOMMU, container.iommu_type)

    for bdf, dev in devices.items():
        ids = dev.ids
        info = {
            "ids": f"{ids.vendor_id:04x}:{ids.device_id:04x}",
            "subsystem": f"{ids.subsystem_vendor_id:04x}:{ids.subsystem_id:04x}",
            "revision": ids.revision,
            "class": hex(ids.class_code),
            "bar0_size": hex(dev.bar0_size),
            "regions": dev.num_regions,
            "irqs": dev.num_irqs,
            "flags": hex(dev.flags),
        }
        check(
            f"ids {bdf}",
            (ids.vendor_id, ids.device_id, ids.class_code) == (0x8086, 0x10C9, 0x020000),
            info,
        )
        mac = mac_from_bar(dev)
        check(f"mac_via_bar0 {bdf}", mac == by_bdf[bdf], {"bar0": mac, "expected": by_bdf[bdf]})
        ctrl, status = dev.read32(CTRL), dev.read32(STATUS)
        check(
            f"ctrl_status {bdf}",
            ALL_ONES not in (ctrl, status),
            {"CTRL": hex(ctrl), "STATUS": hex(status)},
        )
        with timed(f"bus master on+off {bdf}"):
            dev.set_bus_master(True)
            on = dev.read_config(lib.PCI_COMMAND, 2)
            dev.set_bus_master(False)
            off = dev.read_config(lib.PCI_COMMAND, 2)
        check(
            f"bus_master {bdf}",
            on & lib.PCI_COMMAND_MASTER and not off & lib.PCI_COMMAND_MASTER,
            {"command_on": hex(on), "command_off": hex(off)},
        )
        pcie = dev.find_capability(lib.PCI_CAP_ID_EXP)
        check(
            f"pcie_capability {bdf}",
            pcie is not None and not dev.transactions_pending,
            {"offset": hex(pcie) if pcie is not None else None},
        )
        msix = dev.msix_info
        check(
            f"msix_info {bdf}",
            msix.count > 0 and msix.eventfd,
            {"count": msix.count, "flags": hex(msix.flags)},
        )
        check(f"reset_supported {bdf}", dev.reset_supported, hex(dev.flags))
        with timed(f"VFIO_DEVICE_RESET {bdf}"):
            dev.reset()
        status_after = dev.read32(STATUS)
        check(f"status_after_reset {bdf}", status_after != ALL_ONES, hex(status_after))

    # 5. DMA memory
    sizes = [4096, 4096, 4096, 64 << 10, 3 << 20]
    buffers = []
    with timed("dma alloc (2 chunks: 2 MiB + 3 MiB, 4 MiB in hugepages)"):
        for size in sizes:
            buffers.append(container.dma.alloc(size))
    placed = [{"iova": hex(b.iova), "vaddr": hex(b.vaddr), "size": b.size} for b in buffers]
    check(
        "dma_iovas_in_valid_ranges",
        all(any(a <= b.iova and b.iova + b.size - 1 <= e for a, e in ranges) for b in buffers),
        placed,
    )
    check("dma_iova_is_not_va", all(b.iova != b.vaddr for b in buffers), None)
    mapped = container.mappings
    big_page = kernel_page_size(buffers[-1].vaddr)  # 2 MiB: the guest reserves hugepages
    big_chunk = -(-(3 << 20) // big_page) * big_page
    check(
        "dma_mappings_tracked",
        len(mapped) == 2 and container.mapped_bytes == (2 << 20) + big_chunk,
        [{"iova": hex(m.iova), "size": m.size} for m in mapped],
    )
    page = HostMemory(4096, prefer_hugepages=False)
    try:
        container.map_dma(page.address, MSI_WINDOW[0], 4096)
        container.unmap_dma(MSI_WINDOW[0], 4096)
        check("msi_window_map_refused", False, "the kernel mapped IOVA 0xfee00000")
    except VfioDmaError as exc:
        check("msi_window_map_refused", "invalid" in str(exc), str(exc))
    with timed("dma free + unmap 3 MiB"):
        container.dma.free(buffers.pop())
    check("dma_unmap_on_free", len(container.mappings) == 1, len(container.mappings))

    # 6. one owner per group
    try:
        second = VfioContainer()
        try:
            second.add_group(container.groups[0])
            check("group_has_one_owner", False, "a second container attached the same group")
        finally:
            second.close()
    except VfioError as exc:
        check("group_has_one_owner", "already open" in str(exc), str(exc))

    # 7. RLIMIT_MEMLOCK, as an unprivileged daemon would meet it
    drop_ipc_lock()
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, resource.RLIM_INFINITY))
    try:
        container.dma.alloc(4 << 20)
        check("memlock_limit_explained", False, "MAP_DMA of 4 MiB passed a 1 MiB limit")
    except MemlockLimitError as exc:
        text = str(exc)
        check(
            "memlock_limit_explained", "RLIMIT_MEMLOCK is 1 MiB" in text and "4 MiB" in text, text
        )

    # 8. close: devices (bus master off), DMA memory, mappings, fds
    with timed("container close"):
        container.close()
    check("no_mappings_left", container.mappings == [], len(container.mappings))
    check("all_devices_closed", all(d.closed for d in devices.values()), None)
    check("no_vfio_fds_left", vfio_fds() == [], vfio_fds())

    # 9. give the ports back
    for bdf in bdfs:
        with timed(f"release {bdf}"):
            names = pci.release(bdf)
        if igb_loaded:
            check(
                f"released {bdf}",
                sysfs.driver(bdf) == "igb" and names and names == sysfs.netdevs(bdf),
                {"driver": sysfs.driver(bdf), "netdevs": names},
            )
        else:
            check(f"released {bdf}", sysfs.driver(bdf) is None and names == [], sysfs.driver(bdf))
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
