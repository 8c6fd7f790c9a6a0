"""ixyd.vfio on a host without VFIO: the ABI module, IOVA-range parsing, and the container's
logic against a fake type1 kernel.

The real kernel is exercised in the QEMU guest (tests/vm/test_vfio_guest.py). Here the two
ioctl entry points of ixyd.vfio are replaced by `FakeType1`, which answers like
vfio_iommu_type1 does (the two-call GET_INFO protocol, MAP_DMA refusing overlaps and
RLIMIT_MEMLOCK overruns, UNMAP_DMA reporting the unmapped size), and /dev/vfio is a
directory of plain files.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest
from ixyd._vfio import ffi, lib

import ixyd.vfio as vfio
from ixyd.dma import IovaAllocator
from ixyd.errors import DeviceError, DmaError
from ixyd.pci import Sysfs
from ixyd.vfio import (
    FALLBACK_IOVA_RANGES,
    GroupNotViableError,
    MemlockLimitError,
    VfioContainer,
    VfioDmaError,
    VfioError,
    VfioUnavailableError,
    parse_iova_ranges,
)

# What a 6.12 guest with QEMU's VT-d reported
# (docs/reference/vfio-guest.md#vfio-ioctl-sequence, step 4).
GUEST_RANGES = [(0x0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)]
GUEST_PGSIZES = 0x40201000  # 4 KiB | 2 MiB | 1 GiB
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
HEAD = ffi.sizeof("struct vfio_iommu_type1_info")
CAP = ffi.sizeof("struct vfio_iommu_type1_info_cap_iova_range")
RANGE = ffi.sizeof("struct vfio_iova_range")
MIGRATION_CAP_SIZE = 32  # struct vfio_iommu_type1_info_cap_migration


def info_buffer(ranges, *, other_cap_first=True, caps=True) -> bytearray:
    """A VFIO_IOMMU_GET_INFO result laid out with the compiler's structs.

    With `other_cap_first`, a migration capability (id 2) comes first in the chain, as on
    kernels that report both, so the parser has to follow `next`.
    """
    size = HEAD + (MIGRATION_CAP_SIZE if other_cap_first else 0) + CAP + len(ranges) * RANGE
    buf = bytearray(size)
    base = ffi.from_buffer(buf)
    top = ffi.cast("struct vfio_iommu_type1_info *", base)
    top.argsz = size
    top.flags = lib.VFIO_IOMMU_INFO_PGSIZES | (lib.VFIO_IOMMU_INFO_CAPS if caps else 0)
    top.iova_pgsizes = GUEST_PGSIZES
    offset = HEAD
    top.cap_offset = offset if caps else 0
    if other_cap_first:
        other = ffi.cast("struct vfio_info_cap_header *", base + offset)
        other.id, other.version = 2, 1
        offset += MIGRATION_CAP_SIZE
        other.next = offset
    cap = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", base + offset)
    cap.header.id = lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    cap.header.version = 1
    cap.header.next = 0
    cap.nr_iovas = len(ranges)
    for i, (start, end) in enumerate(ranges):
        cap.iova_ranges[i].start, cap.iova_ranges[i].end = start, end
    return buf


# ------------------------------------------------------------------ the ABI module
def test_ioctl_numbers_are_the_kernels_io_semicolon_100_plus_n():
    """The compiler's values agree with the documented ABI: _IO(';', 100+n)
    (docs/reference/vfio-guest.md#vfio-ioctl-sequence)."""

    def io(n):
        return (ord(";") << 8) | (100 + n)

    assert lib.VFIO_GET_API_VERSION == io(0)
    assert lib.VFIO_CHECK_EXTENSION == io(1)
    assert lib.VFIO_SET_IOMMU == io(2)
    assert lib.VFIO_GROUP_GET_STATUS == io(3)
    assert lib.VFIO_GROUP_SET_CONTAINER == io(4)
    assert lib.VFIO_GROUP_GET_DEVICE_FD == io(6)
    assert lib.VFIO_DEVICE_GET_INFO == io(7)
    assert lib.VFIO_DEVICE_GET_REGION_INFO == io(8)
    assert lib.VFIO_DEVICE_GET_IRQ_INFO == io(9)
    assert lib.VFIO_DEVICE_SET_IRQS == io(10)
    assert lib.VFIO_DEVICE_RESET == io(11)
    assert lib.VFIO_IOMMU_GET_INFO == io(12)
    assert lib.VFIO_IOMMU_MAP_DMA == io(13)
    assert lib.VFIO_IOMMU_UNMAP_DMA == io(14)
    assert (lib.VFIO_TYPE1_IOMMU, lib.VFIO_TYPE1v2_IOMMU) == (1, 3)


def test_struct_sizes_are_the_argsz_the_guest_kernel_accepted():
    assert ffi.sizeof("struct vfio_group_status") == 8
    assert ffi.sizeof("struct vfio_iommu_type1_info") == 24
    assert ffi.sizeof("struct vfio_iommu_type1_dma_map") == 32
    assert ffi.sizeof("struct vfio_iommu_type1_dma_unmap") == 24
    assert ffi.sizeof("struct vfio_region_info") == 32
    assert ffi.sizeof("struct vfio_irq_info") == 16
    assert ffi.offsetof("struct vfio_iommu_type1_info_cap_iova_range", "iova_ranges") == 16
    assert (lib.VFIO_PCI_BAR0_REGION_INDEX, lib.VFIO_PCI_CONFIG_REGION_INDEX) == (0, 7)
    assert lib.VFIO_PCI_MSIX_IRQ_INDEX == 2
    assert (lib.PCI_COMMAND, lib.PCI_COMMAND_MASTER) == (0x04, 0x4)


def test_mmio_helpers_make_one_access_at_the_byte_offset():
    bar = ffi.new("uint32_t[8]")
    lib.ixyd_vfio_write32(bar, 0x8, 0xDEADBEEF)
    assert list(bar) == [0, 0, 0xDEADBEEF, 0, 0, 0, 0, 0]
    assert lib.ixyd_vfio_read32(bar, 0x8) == 0xDEADBEEF


# ------------------------------------------------------------------ IOVA ranges
def test_iova_ranges_are_found_by_walking_the_capability_chain():
    assert parse_iova_ranges(bytes(info_buffer(GUEST_RANGES))) == GUEST_RANGES
    single = info_buffer([(0x1000, 0x7FFFFFFFFF)], other_cap_first=False)
    assert parse_iova_ranges(bytes(single)) == [(0x1000, 0x7FFFFFFFFF)]


def test_no_capability_chain_means_no_ranges():
    assert parse_iova_ranges(bytes(info_buffer(GUEST_RANGES, caps=False))) is None


def test_a_chain_without_the_iova_capability_means_no_ranges():
    buf = info_buffer(GUEST_RANGES)
    cap = ffi.cast("struct vfio_info_cap_header *", ffi.from_buffer(buf) + HEAD)
    cap.next = 0  # the chain ends after the migration capability
    assert parse_iova_ranges(bytes(buf)) is None


def test_truncated_first_call_result_has_no_ranges():
    """The first GET_INFO call (argsz 24) sets CAPS but cap_offset 0: no chain yet."""
    buf = info_buffer(GUEST_RANGES)[:HEAD]
    ffi.cast("struct vfio_iommu_type1_info *", ffi.from_buffer(buf)).cap_offset = 0
    assert parse_iova_ranges(bytes(buf)) is None


@pytest.mark.parametrize("damage", ["loop", "offset_outside", "ranges_past_end", "short"])
def test_malformed_capability_chain_is_an_error_not_trusted(damage):
    buf = info_buffer(GUEST_RANGES)
    base = ffi.from_buffer(buf)
    if damage == "loop":
        ffi.cast("struct vfio_info_cap_header *", base + HEAD).next = HEAD
    elif damage == "offset_outside":
        ffi.cast("struct vfio_iommu_type1_info *", base).cap_offset = len(buf) + 8
    elif damage == "ranges_past_end":
        cap = ffi.cast(
            "struct vfio_iommu_type1_info_cap_iova_range *", base + HEAD + MIGRATION_CAP_SIZE
        )
        cap.nr_iovas = 3
    else:
        buf = buf[: HEAD - 1]
    with pytest.raises(VfioError):
        parse_iova_ranges(bytes(buf))


def test_fallback_ranges_avoid_the_msi_window_and_stay_within_39_bits():
    for start, end in FALLBACK_IOVA_RANGES:
        assert end < MSI_WINDOW[0] or start > MSI_WINDOW[1]
        assert end < 1 << 39
    covered = sum(end - start + 1 for start, end in FALLBACK_IOVA_RANGES)
    assert covered == (1 << 39) - (MSI_WINDOW[1] - MSI_WINDOW[0] + 1)
    first = IovaAllocator(FALLBACK_IOVA_RANGES).allocate(2 << 20, 2 << 20)
    assert first == 2 << 20  # from the bottom, far from any host VA


# ------------------------------------------------------------------ no VFIO on this host
@pytest.mark.skipif(os.path.exists("/dev/vfio/vfio"), reason="this host has VFIO")
def test_container_on_a_host_without_vfio_says_load_vfio_pci_and_enable_the_iommu():
    with pytest.raises(DeviceError) as caught:
        VfioContainer()
    assert isinstance(caught.value, VfioUnavailableError)
    message = str(caught.value)
    assert "/dev/vfio/vfio does not exist" in message
    assert "modprobe vfio-pci" in message and "intel_iommu=on" in message


def test_missing_vfio_with_modules_loaded_blames_only_the_iommu(tmp_path):
    (tmp_path / "sys" / "module" / "vfio").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    with pytest.raises(VfioUnavailableError) as caught:
        VfioContainer(vfio_dir=str(tmp_path / "dev"), sysfs=Sysfs(str(tmp_path / "sys")))
    assert "modprobe" not in str(caught.value)
    assert "no IOMMU groups" in str(caught.value) and "intel_iommu=on" in str(caught.value)


# ------------------------------------------------------------------ a fake type1 kernel
class FakeType1:
    """Answers the container and group ioctls the way vfio_iommu_type1 does."""

    def __init__(self, ranges=GUEST_RANGES, *, caps=True, viable=True, memlock=None):
        self.ranges = ranges
        self.caps = caps
        self.viable = viable
        self.memlock = memlock  # bytes that may be pinned; None: unlimited
        self.iommu = None
        self.attached = 0
        self.mappings: dict[int, tuple[int, int]] = {}
        self.info_calls = 0

    def ioctl(self, fd, request, arg):
        if request == lib.VFIO_GROUP_GET_STATUS:
            arg.flags = lib.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
        elif request == lib.VFIO_GROUP_SET_CONTAINER:
            self.attached += 1
        elif request == lib.VFIO_IOMMU_GET_INFO:
            self.info_calls += 1
            full = info_buffer(self.ranges, caps=self.caps)
            if arg.argsz < len(full):
                arg.argsz, arg.flags = (
                    len(full),
                    ffi.cast("struct vfio_iommu_type1_info *", ffi.from_buffer(full)).flags,
                )
                arg.iova_pgsizes, arg.cap_offset = GUEST_PGSIZES, 0
            else:
                ffi.memmove(arg, full, len(full))
        elif request == lib.VFIO_IOMMU_MAP_DMA:
            assert arg.flags == lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
            if any(
                arg.iova < i + s and i < arg.iova + arg.size for i, (s, _) in self.mappings.items()
            ):
                raise OSError(errno.EEXIST, "exists")
            pinned = sum(s for s, _ in self.mappings.values())
            if self.memlock is not None and pinned + arg.size > self.memlock:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            self.mappings[arg.iova] = (arg.size, arg.vaddr)
        elif request == lib.VFIO_IOMMU_UNMAP_DMA:
            size, _ = self.mappings.pop(arg.iova)
            arg.size = size
        else:
            raise AssertionError(f"unexpected ioctl {request:#x}")
        return 0

    def ioctl_value(self, fd, request, value=0):
        if request == lib.VFIO_GET_API_VERSION:
            return lib.VFIO_API_VERSION
        if request == lib.VFIO_CHECK_EXTENSION:
            return int(value in (lib.VFIO_TYPE1_IOMMU, lib.VFIO_TYPE1v2_IOMMU))
        if request == lib.VFIO_SET_IOMMU:
            self.iommu = value
            return 0
        if request == lib.VFIO_GROUP_UNSET_CONTAINER:
            self.attached -= 1
            return 0
        raise AssertionError(f"unexpected ioctl {request:#x}")


@pytest.fixture
def fake_kernel(monkeypatch):
    kernel = FakeType1()
    monkeypatch.setattr(vfio, "_ioctl", kernel.ioctl)
    monkeypatch.setattr(vfio, "_ioctl_value", kernel.ioctl_value)
    return kernel


@pytest.fixture
def vfio_dir(tmp_path):
    """/dev/vfio as plain files: the container node and group nodes 14 and 15."""
    d = tmp_path / "dev-vfio"
    d.mkdir()
    for name in ("vfio", "14", "15"):
        (d / name).write_bytes(b"")
    return d


@pytest.fixture
def group_sysfs(tmp_path):
    """Group 14: 0000:03:00.0 on vfio-pci, 0000:03:00.1 on ixgbe, a bridge on pcieport."""
    root = tmp_path / "sys"
    for address, driver in (
        ("0000:03:00.0", "vfio-pci"),
        ("0000:03:00.1", "ixgbe"),
        ("0000:00:01.0", "pcieport"),
    ):
        (root / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        dev = root / "bus" / "pci" / "devices" / address
        dev.mkdir(parents=True)
        (dev / "driver").symlink_to(root / "bus" / "pci" / "drivers" / driver)
        group = root / "kernel" / "iommu_groups" / "14"
        (group / "devices").mkdir(parents=True, exist_ok=True)
        (group / "devices" / address).symlink_to(dev)
        (dev / "iommu_group").symlink_to(group)
    (root / "bus" / "pci" / "devices" / "0000:05:00.0").mkdir()  # no IOMMU group
    return Sysfs(str(root))


def open_container(vfio_dir, sysfs=None) -> VfioContainer:
    return VfioContainer(vfio_dir=str(vfio_dir), sysfs=sysfs, prefer_hugepages=False)


def test_container_negotiates_type1v2_and_reads_ranges_with_two_get_info_calls(
    fake_kernel, vfio_dir
):
    with open_container(vfio_dir) as container:
        assert container.iommu_type == lib.VFIO_TYPE1v2_IOMMU
        with pytest.raises(VfioError, match="open a device"):
            container.valid_iova_ranges()
        container.add_group(14)
        container.add_group(14)  # already attached: no-op
        assert fake_kernel.iommu == lib.VFIO_TYPE1v2_IOMMU
        assert fake_kernel.attached == 1 and container.groups == [14]
        assert fake_kernel.info_calls == 2  # argsz 24 first, then the size the kernel asked for
        assert container.valid_iova_ranges() == GUEST_RANGES
        assert container.iova_pgsizes == GUEST_PGSIZES
    assert fake_kernel.attached == 0


def test_kernel_without_iova_capability_gets_the_fallback_and_a_warning(
    fake_kernel, vfio_dir, caplog
):
    fake_kernel.caps = False
    with caplog.at_level(logging.WARNING, logger="ixyd.vfio"), open_container(vfio_dir) as c:
        c.add_group(14)
        assert c.valid_iova_ranges() == FALLBACK_IOVA_RANGES
    assert "no valid IOVA ranges" in caplog.text and "0xfef00000" in caplog.text


def test_dma_buffers_get_iovas_inside_the_valid_ranges_and_close_unmaps_everything(
    fake_kernel, vfio_dir
):
    container = open_container(vfio_dir)
    container.add_group(14)
    buffers = [container.dma.alloc(4096) for _ in range(3)] + [container.dma.alloc(3 << 20)]
    for b in buffers:
        assert any(lo <= b.iova and b.iova + b.size - 1 <= hi for lo, hi in GUEST_RANGES)
        assert b.iova != b.vaddr
    assert len(container.mappings) == 2 == len(fake_kernel.mappings)  # one 2 MiB chunk + one 3 MiB
    assert container.mapped_bytes == (2 << 20) + (3 << 20)
    container.close()
    assert container.mappings == [] and fake_kernel.mappings == {}
    assert fake_kernel.attached == 0
    with pytest.raises(VfioError, match="closed"):
        container.add_group(15)


def test_map_dma_over_the_memlock_limit_says_how_much_is_needed(fake_kernel, vfio_dir):
    fake_kernel.memlock = 2 << 20
    with open_container(vfio_dir) as container:
        container.add_group(14)
        container.dma.alloc(4096)  # the first 2 MiB chunk fits
        with pytest.raises(MemlockLimitError) as caught:
            container.dma.alloc(4 << 20)
    message = str(caught.value)
    assert isinstance(caught.value, DmaError)
    assert "VFIO_IOMMU_MAP_DMA of 4 MiB" in message
    assert "RLIMIT_MEMLOCK is" in message
    assert "needs at least 6 MiB locked (2 MiB already mapped + 4 MiB)" in message
    assert "LimitMEMLOCK=" in message and "ulimit -l" in message


def test_overlapping_map_and_unknown_unmap_are_refused(fake_kernel, vfio_dir):
    with open_container(vfio_dir) as container:
        container.add_group(14)
        memory = container.dma.alloc(4096)
        chunk = container.mappings[0]
        with pytest.raises(VfioDmaError, match="overlaps"):
            container.map_dma(memory.vaddr, chunk.iova, 4096)
        with pytest.raises(VfioDmaError, match="no DMA mapping"):
            container.unmap_dma(0x7000_0000, 4096)


def test_group_that_is_not_viable_names_the_device_and_its_driver(
    fake_kernel, vfio_dir, group_sysfs
):
    fake_kernel.viable = False
    with open_container(vfio_dir, group_sysfs) as container:
        with pytest.raises(GroupNotViableError) as caught:
            container.add_group(14)
        assert container.groups == [] and fake_kernel.attached == 0
    assert str(caught.value).startswith(
        "IOMMU group 14 is not viable: 0000:03:00.1 is bound to ixgbe; bind it to vfio-pci"
    )


def test_group_node_missing_means_not_bound_to_vfio_pci(fake_kernel, vfio_dir):
    os.unlink(vfio_dir / "15")
    with open_container(vfio_dir) as container, pytest.raises(VfioError, match="bind it first"):
        container.add_group(15)


def test_device_without_iommu_group_is_refused_with_the_iommu_hint(
    fake_kernel, vfio_dir, group_sysfs
):
    with open_container(vfio_dir, group_sysfs) as container:
        with pytest.raises(VfioError, match=r"0000:05:00.0 has no IOMMU group.*intel_iommu=on"):
            container.open_device("05:00.0")
        with pytest.raises(VfioError, match="no PCI device 0000:07:00.0"):
            container.open_device("0000:07:00.0")


def test_a_later_group_may_not_narrow_the_ranges_dma_memory_was_built_from(fake_kernel, vfio_dir):
    with open_container(vfio_dir) as container:
        container.add_group(14)
        container.dma.alloc(4096)
        fake_kernel.ranges = [(0x0, 0xFEDFFFFF)]  # group 15 has a smaller address width
        with pytest.raises(VfioError, match="narrows the valid IOVA ranges"):
            container.add_group(15)
        assert container.groups == [14] and fake_kernel.attached == 1
        assert container.valid_iova_ranges() == GUEST_RANGES


def test_unavailable_group_does_not_leak_its_fd(fake_kernel, vfio_dir, group_sysfs):
    fake_kernel.viable = False
    before = len(os.listdir("/proc/self/fd"))
    with open_container(vfio_dir, group_sysfs) as container:
        for _ in range(3):
            with pytest.raises(GroupNotViableError):
                container.add_group(14)
    assert len(os.listdir("/proc/self/fd")) == before


def test_vfio_classes_implement_the_seam():
    from ixyd.device import PciFunction
    from ixyd.dma import DmaMapper

    assert issubclass(vfio.VfioDevice, PciFunction) and not vfio.VfioDevice.__abstractmethods__
    assert issubclass(VfioContainer, DmaMapper) and not VfioContainer.__abstractmethods__
