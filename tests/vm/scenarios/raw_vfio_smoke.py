"""Raw VFIO smoke test, run inside the test guest: the legacy type1 container/group API
from plain Python (fcntl.ioctl, struct, mmap), as in
docs/reference/vfio-guest.md#vfio-ioctl-sequence.

Binds 0000:01:00.0 (the igb with MAC 52:54:00:00:00:02) to vfio-pci, opens the container
and its group, checks the group is viable, selects type1v2, reads the IOMMU's valid IOVA
ranges (the interrupt window 0xfee00000-0xfeefffff must be excluded), opens the device
and reads its MAC from BAR0. Prints one `RESULT <json>` line; exits 1 on the first failure.

    .venv/bin/python tests/vm/harness.py -- .venv/bin/python tests/vm/scenarios/raw_vfio_smoke.py
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import sys

import guest_pci

BDF = "0000:01:00.0"
EXPECTED_MAC = "52:54:00:00:00:02"

# linux/vfio.h: every ioctl is _IO(VFIO_TYPE, VFIO_BASE + n), VFIO_TYPE = ';', VFIO_BASE = 100.
VFIO_TYPE, VFIO_BASE = ord(";"), 100


def vfio_ioctl(n: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


VFIO_GET_API_VERSION = vfio_ioctl(0)
VFIO_CHECK_EXTENSION = vfio_ioctl(1)
VFIO_SET_IOMMU = vfio_ioctl(2)
VFIO_GROUP_GET_STATUS = vfio_ioctl(3)
VFIO_GROUP_SET_CONTAINER = vfio_ioctl(4)
VFIO_GROUP_GET_DEVICE_FD = vfio_ioctl(6)
VFIO_DEVICE_GET_INFO = vfio_ioctl(7)
VFIO_DEVICE_GET_REGION_INFO = vfio_ioctl(8)
VFIO_IOMMU_GET_INFO = vfio_ioctl(12)

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2

IOMMU_INFO = struct.Struct("<IIQII")  # argsz, flags, iova_pgsizes, cap_offset, pad
CAP_HEADER = struct.Struct("<HHI")  # id, version, next
IOVA_RANGES = struct.Struct("<II")  # nr_iovas, pad; then {u64 start, u64 end} each
DEVICE_INFO = struct.Struct("<IIIIII")  # argsz, flags, num_regions, num_irqs, cap_offset, pad
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset

MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # x86 interrupt addresses: never valid DMA targets


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def group_status(group: int) -> int:
    status = bytearray(struct.pack("<II", 8, 0))
    fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status, True)
    return struct.unpack("<II", status)[1]


def iova_ranges(container: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(flags, iova_pgsizes, [(start, end), ...]) from VFIO_IOMMU_GET_INFO and its caps."""
    info = bytearray(IOMMU_INFO.pack(IOMMU_INFO.size, 0, 0, 0, 0))
    fcntl.ioctl(container, VFIO_IOMMU_GET_INFO, info, True)
    needed = IOMMU_INFO.unpack_from(info)[0]  # the kernel raises argsz to fit the caps
    info = bytearray(IOMMU_INFO.pack(needed, 0, 0, 0, 0) + bytes(needed - IOMMU_INFO.size))
    fcntl.ioctl(container, VFIO_IOMMU_GET_INFO, info, True)
    _, flags, pgsizes, offset, _ = IOMMU_INFO.unpack_from(info)
    ranges = []
    while flags & VFIO_IOMMU_INFO_CAPS and offset:
        cap_id, _, next_offset = CAP_HEADER.unpack_from(info, offset)
        if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            count, _ = IOVA_RANGES.unpack_from(info, offset + CAP_HEADER.size)
            first = offset + CAP_HEADER.size + IOVA_RANGES.size
            ranges = [struct.unpack_from("<QQ", info, first + 16 * i) for i in range(count)]
        offset = next_offset
    return flags, pgsizes, ranges


def main() -> None:
    guest_pci.bind_to_vfio_pci(BDF)
    group_number = guest_pci.iommu_group(BDF)
    check(
        guest_pci.bound_driver(BDF) == "vfio-pci", f"{BDF} bound to vfio-pci, group {group_number}"
    )

    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    check(
        fcntl.ioctl(container, VFIO_GET_API_VERSION) == VFIO_API_VERSION, "VFIO_GET_API_VERSION 0"
    )
    check(
        fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1, "type1v2 supported"
    )

    group = os.open(f"/dev/vfio/{group_number}", os.O_RDWR)
    check(group_status(group) & VFIO_GROUP_FLAGS_VIABLE != 0, f"group {group_number} viable")
    fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, struct.pack("<i", container))
    check(group_status(group) & VFIO_GROUP_FLAGS_CONTAINER_SET != 0, "group attached to container")
    check(fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) == 0, "VFIO_SET_IOMMU type1v2")

    flags, pgsizes, ranges = iova_ranges(container)
    check(
        flags & VFIO_IOMMU_INFO_PGSIZES != 0 and pgsizes & 0x1000 != 0, f"page sizes {pgsizes:#x}"
    )
    check(
        len(ranges) > 0,
        "IOVA range capability: " + ", ".join(f"[{s:#x}-{e:#x}]" for s, e in ranges),
    )
    check(
        all(end < MSI_WINDOW[0] or start > MSI_WINDOW[1] for start, end in ranges),
        "IOVA ranges exclude the interrupt window 0xfee00000-0xfeefffff",
    )

    name = bytearray(BDF.encode() + b"\0")
    device = fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name, True)  # mutable: returns the fd
    check(device >= 0, f"device fd for {BDF}")
    info = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_INFO, info, True)
    _, device_flags, regions, irqs, _, _ = DEVICE_INFO.unpack(info)
    check(
        device_flags & VFIO_DEVICE_FLAGS_PCI != 0,
        f"PCI device, {regions} regions, {irqs} irq indexes",
    )
    region = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, VFIO_PCI_BAR0_REGION_INDEX, 0, 0, 0))
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, region, True)
    _, region_flags, _, _, bar0_size, bar0_offset = REGION_INFO.unpack(region)
    check(region_flags & VFIO_REGION_INFO_FLAG_MMAP != 0, f"BAR0 mmappable, {bar0_size:#x} bytes")
    bar0 = mmap.mmap(
        device, bar0_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=bar0_offset
    )
    ral, rah = guest_pci.read32(bar0, guest_pci.RAL0), guest_pci.read32(bar0, guest_pci.RAH0)
    bar0.close()
    mac = ":".join(f"{b:02x}" for b in struct.pack("<IH", ral, rah & 0xFFFF))
    check(mac == EXPECTED_MAC, f"{BDF} BAR0 RAL0/RAH0 give MAC {mac}")

    os.close(device)
    os.close(group)
    os.close(container)
    print(
        "RESULT "
        + json.dumps(
            {
                "bdf": BDF,
                "iommu_group": group_number,
                "mac": mac,
                "iova_pgsizes": pgsizes,
                "iova_ranges": ranges,
                "regions": regions,
                "irq_indexes": irqs,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
