"""Guest-side helpers for scenario scripts: find the igb ports, read their MACs, bind them.

Runs inside the test guest (as root, stdlib only); import it from a scenario in this
directory with `import guest_pci`. The guest has two igb functions (82576, 8086:10c9)
wired back to back; see tests/vm/harness.py for the topology. Identify them by MAC:

    ports = guest_pci.igb_addresses_in_guest()   # {"52:54:00:00:00:01": "0000:02:00.0", ...}
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from pathlib import Path

PCI_DEVICES = Path("/sys/bus/pci/devices")
IGB_VENDOR, IGB_DEVICE = 0x8086, 0x10C9  # 82576 as emulated by QEMU's igb

# 82576 receive address 0 (Linux e1000_regs.h E1000_RAL(0)/E1000_RAH(0)): the MAC from the
# EEPROM, loaded at reset (QEMU's igb has it there before any driver touches the device).
# RAH bit 31 (AV) marks the entry valid.
RAL0, RAH0 = 0x05400, 0x05404
RAH_AV = 1 << 31
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1  # memory space decoding: BAR0 answers only with it on

BAR0_MAPPED = 0x10000  # covers RAL0/RAH0
BIND_WAIT_S = 5.0


class GuestPciError(RuntimeError):
    """A PCI step in the guest failed; the message says which device and why."""


def read32(bar: mmap.mmap, offset: int) -> int:
    """One aligned 32-bit load from a mapped BAR (ctypes gives a single load of that width;
    struct.unpack_from copies with whatever widths memcpy picks)."""
    word = ctypes.c_uint32.from_buffer(bar, offset)
    try:
        return word.value
    finally:
        del word  # the mmap cannot close while a ctypes view holds it


def pci_id(bdf: str) -> tuple[int, int]:
    """(vendor, device) of a PCI function."""
    device = PCI_DEVICES / bdf
    return int((device / "vendor").read_text(), 16), int((device / "device").read_text(), 16)


def igb_functions() -> list[str]:
    """PCI addresses (BDFs) of the igb functions in the guest, sorted."""
    return sorted(
        d.name for d in PCI_DEVICES.iterdir() if pci_id(d.name) == (IGB_VENDOR, IGB_DEVICE)
    )


def bound_driver(bdf: str) -> str | None:
    """Name of the driver bound to `bdf`, or None."""
    link = PCI_DEVICES / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def iommu_group(bdf: str) -> int:
    """The IOMMU group number of `bdf` (raises GuestPciError without an IOMMU)."""
    link = PCI_DEVICES / bdf / "iommu_group"
    if not link.is_symlink():
        raise GuestPciError(f"{bdf} has no iommu_group: is the IOMMU on (intel_iommu=on)?")
    return int(os.path.basename(os.readlink(link)))


def read_mac(bdf: str) -> str:
    """The MAC of an igb function: from its netdev under the igb driver, else from RAL0/RAH0
    through sysfs resource0 (no driver bound). Not while vfio-pci holds the device."""
    netdevs = sorted((PCI_DEVICES / bdf / "net").glob("*/address"))
    if netdevs:
        return netdevs[0].read_text().strip()
    driver = bound_driver(bdf)
    if driver is not None:
        raise GuestPciError(f"{bdf} is bound to {driver}: read its MAC before binding it")
    config = PCI_DEVICES / bdf / "config"
    with open(config, "r+b", buffering=0) as cfg:  # unbuffered: each write reaches the device
        cfg.seek(PCI_COMMAND)
        command = struct.unpack("<H", cfg.read(2))[0]
        if not command & PCI_COMMAND_MEMORY:
            cfg.seek(PCI_COMMAND)
            cfg.write(struct.pack("<H", command | PCI_COMMAND_MEMORY))
        try:
            with open(PCI_DEVICES / bdf / "resource0", "r+b") as bar:
                regs = mmap.mmap(bar.fileno(), BAR0_MAPPED)
                try:
                    ral, rah = read32(regs, RAL0), read32(regs, RAH0)
                finally:
                    regs.close()
        finally:
            cfg.seek(PCI_COMMAND)
            cfg.write(struct.pack("<H", command))
    if not rah & RAH_AV:
        raise GuestPciError(f"{bdf}: RAH0 {rah:#010x} has no valid address (AV clear)")
    mac = struct.pack("<IH", ral, rah & 0xFFFF)
    return ":".join(f"{b:02x}" for b in mac)


def igb_addresses_in_guest() -> dict[str, str]:
    """MAC -> PCI address of each igb function, e.g. {"52:54:00:00:00:02": "0000:01:00.0"}.
    Call it before binding the ports to vfio-pci (or with igb bound)."""
    return {read_mac(bdf): bdf for bdf in igb_functions()}


def bind_to_vfio_pci(bdf: str) -> None:
    """Hands `bdf` to vfio-pci (unbinding its current driver) and waits for /dev/vfio/<group>.
    vfio-pci must be loaded (the harness loads it)."""
    device = PCI_DEVICES / bdf
    driver = bound_driver(bdf)
    if driver == "vfio-pci":
        return
    if driver is not None:
        (device / "driver" / "unbind").write_text(bdf)
    (device / "driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    group_dev = Path(f"/dev/vfio/{iommu_group(bdf)}")
    deadline = time.monotonic() + BIND_WAIT_S
    while not (bound_driver(bdf) == "vfio-pci" and group_dev.exists()):
        if time.monotonic() > deadline:
            raise GuestPciError(
                f"{bdf} not bound to vfio-pci after {BIND_WAIT_S} s "
                f"(driver: {bound_driver(bdf)}, {group_dev} exists: {group_dev.exists()})"
            )
        time.sleep(0.01)


def release_from_vfio_pci(bdf: str) -> None:
    """Unbinds `bdf` from vfio-pci, clears the override and lets the kernel re-probe it
    (igb takes it back when loaded)."""
    device = PCI_DEVICES / bdf
    if bound_driver(bdf) is not None:
        (device / "driver" / "unbind").write_text(bdf)
    (device / "driver_override").write_text("\n")
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)


if __name__ == "__main__":
    for mac, bdf in sorted(igb_addresses_in_guest().items()):
        print(f"{bdf} {mac} iommu_group={iommu_group(bdf)} driver={bound_driver(bdf)}")


def mac_from_bar(device) -> str | None:
    """Receive address 0 read through an open device's BAR0 (`device.read32`), or None
    while its address-valid bit is clear."""
    ral, rah = device.read32(RAL0), device.read32(RAH0)
    if not rah & RAH_AV:
        return None
    raw = ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")
    return ":".join(f"{b:02x}" for b in raw)


def vfio_fds() -> list[str]:
    """What this process' VFIO file descriptors point at: /dev/vfio nodes and VFIO's
    anonymous inodes (device fds)."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/dev/vfio") or "vfio" in target:
            targets.append(target)
    return sorted(targets)
