"""The VFIO backend of the device seam: a real PCI function through the kernel's vfio-pci.

Two objects, the same two the kernel has:

- `VfioContainer` is the IOMMU context: /dev/vfio/vfio with the type1 IOMMU. Groups are
  attached to it, and it maps DMA memory at IOVAs chosen from the ranges the kernel
  reports (VFIO_IOMMU_GET_INFO, IOVA-range capability), never IOVA = VA (the ixy bug,
  docs/reference/peers.md#ixys-vfio-path). Every device opened through one container
  shares its IOVA space and its `DmaMemory`. It is the only class that knows the type1
  API: an iommufd backend would be another class with the same `open_device(address) ->
  fd` and DmaMapper methods.
- `VfioDevice` is one PCI function: its device fd, BAR0 mapped into this process and
  accessed with single aligned 32-bit loads and stores, config space through pread and
  pwrite, reset and interrupt information.

The ioctl sequence, and the values it returned in a QEMU guest with a virtual VT-d, are in
docs/reference/vfio-guest.md#vfio-ioctl-sequence. Struct layouts, ioctl numbers and flags
come from the kernel headers via the compiler (`ixyd._vfio`, built by ixyd/native/build_vfio.py).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from dataclasses import dataclass

from ._vfio import ffi, lib
from .device import ALL_ONES, PciFunction, PciIds, parse_pci_address
from .dma import DmaMapper, DmaMemory, Mapping
from .errors import DeviceError, DmaError
from .pci import Sysfs, group_blockers

__all__ = [
    "FALLBACK_IOVA_RANGES",
    "GroupNotViableError",
    "IrqInfo",
    "MemlockLimitError",
    "VfioContainer",
    "VfioDevice",
    "VfioDmaError",
    "VfioError",
    "VfioUnavailableError",
    "parse_iova_ranges",
]

log = logging.getLogger(__name__)

# Used only when the kernel does not report valid IOVA ranges (type1 before Linux 5.4).
# Leaves out the x86 MSI window 0xFEE00000-0xFEEFFFFF, which every x86 IOMMU reserves for
# interrupt messages, and stays below 2^39: 39 bits is the smallest VT-d address width in
# common use (ixy.rs PR #26), and it also keeps clear of AMD's HyperTransport hole at
# 0xFD_0000_0000. IOVAs are allocated from the bottom, so real use stays far below that.
FALLBACK_IOVA_RANGES = [(0x0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]
_CONFIG_SIZES = (1, 2, 4)  # config space accesses a register at a time


class VfioError(DeviceError):
    """The kernel's VFIO refused a request; the message says why and what to do."""


class VfioUnavailableError(VfioError):
    """There is no VFIO on this system: /dev/vfio/vfio is missing."""


class GroupNotViableError(VfioError):
    """An IOMMU group holds a device that is still bound to a kernel driver."""


class VfioDmaError(DmaError):
    """VFIO_IOMMU_MAP_DMA or VFIO_IOMMU_UNMAP_DMA failed."""


class MemlockLimitError(VfioDmaError):
    """Pinning DMA memory would exceed RLIMIT_MEMLOCK."""


def _ioctl(fd: int, request: int, arg) -> int:
    """ioctl(2) with a struct pointer; raises OSError carrying the errno."""
    rc = lib.ixyd_vfio_ioctl(fd, request, arg)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def _ioctl_value(fd: int, request: int, value: int = 0) -> int:
    """ioctl(2) with an integer argument; raises OSError carrying the errno."""
    rc = lib.ixyd_vfio_ioctl_value(fd, request, value)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def _new(struct: str):
    """A zeroed struct with argsz set, as every VFIO ioctl expects."""
    p = ffi.new(f"struct {struct} *")
    p.argsz = ffi.sizeof(p[0])
    return p


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def _ranges_text(ranges) -> str:
    return ", ".join(f"{first:#x}-{last:#x}" for first, last in ranges)


def parse_iova_ranges(info: bytes) -> list[tuple[int, int]] | None:
    """Valid IOVA ranges from a VFIO_IOMMU_GET_INFO result, None when it has none.

    `info` is the whole buffer the kernel filled: `struct vfio_iommu_type1_info`, then the
    capability chain. The chain is walked by offset (each `next` is from the start of the
    buffer, 0 ends it) until the IOVA_RANGE capability is found. Ranges are inclusive
    (first, last) pairs. A malformed chain (offsets out of the buffer, a loop) raises
    VfioError rather than being trusted.
    """
    head = ffi.sizeof("struct vfio_iommu_type1_info")
    if len(info) < head:
        raise VfioError(f"VFIO_IOMMU_GET_INFO returned {len(info)} bytes, fewer than {head}")
    buf = ffi.from_buffer(info)
    top = ffi.cast("struct vfio_iommu_type1_info *", buf)
    if not top.flags & lib.VFIO_IOMMU_INFO_CAPS:
        return None
    offset, seen = top.cap_offset, set()
    cap_size = ffi.sizeof("struct vfio_iommu_type1_info_cap_iova_range")
    range_size = ffi.sizeof("struct vfio_iova_range")
    while offset:
        if (
            offset in seen
            or offset < head
            or offset + ffi.sizeof("struct vfio_info_cap_header") > len(info)
        ):
            raise VfioError(
                f"VFIO_IOMMU_GET_INFO: bad capability offset {offset} in {len(info)} bytes"
            )
        seen.add(offset)
        cap = ffi.cast("struct vfio_info_cap_header *", buf + offset)
        if cap.id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            ranges = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", cap)
            count = ranges.nr_iovas if offset + cap_size <= len(info) else -1
            if count < 0 or offset + cap_size + count * range_size > len(info):
                raise VfioError("VFIO_IOMMU_GET_INFO: IOVA-range capability runs past the buffer")
            return [(r.start, r.end) for r in ranges.iova_ranges[0:count]]
        offset = cap.next
    return None


@dataclass(frozen=True)
class IrqInfo:
    """One interrupt index of a device (VFIO_DEVICE_GET_IRQ_INFO)."""

    index: int
    count: int
    flags: int

    @property
    def eventfd(self) -> bool:
        """The index can signal an eventfd (what MSI-X delivery needs)."""
        return bool(self.flags & lib.VFIO_IRQ_INFO_EVENTFD)


class _Group:
    def __init__(self, number: int, fd: int):
        self.number = number
        self.fd = fd


class VfioContainer(DmaMapper):
    """A VFIO container with the type1 IOMMU: groups, valid IOVA ranges, DMA mappings.

    Open every device before allocating DMA memory: the kernel narrows the valid ranges to
    what all attached groups allow, and `dma` is built from the ranges at first use.
    `close()` closes the devices still open (bus master off first), unmaps every mapping
    and closes the group and container fds.

    Raises VfioUnavailableError when the system has no VFIO, VfioError otherwise.
    """

    def __init__(
        self,
        *,
        vfio_dir: str = "/dev/vfio",
        sysfs: Sysfs | None = None,
        prefer_hugepages: bool = True,
    ):
        self.vfio_dir = vfio_dir
        self.sysfs = sysfs or Sysfs()
        self._prefer_hugepages = prefer_hugepages
        self._groups: dict[int, _Group] = {}
        self._devices: list[VfioDevice] = []
        self._mappings: dict[int, Mapping] = {}
        self._dma: DmaMemory | None = None
        self._ranges: list[tuple[int, int]] | None = None
        self._iommu_set = False
        self.iova_pgsizes = 0
        self.closed = False
        path = os.path.join(vfio_dir, "vfio")
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioUnavailableError(self._why_no_vfio(path)) from None
        except PermissionError:
            raise VfioError(
                f"permission denied opening {path}: run as root, or make it readable and "
                f"writable for this user (it is normally mode 0666)"
            ) from None
        try:
            version = _ioctl_value(self._fd, lib.VFIO_GET_API_VERSION)
            if version != lib.VFIO_API_VERSION:
                raise VfioError(
                    f"{path} speaks VFIO API version {version}, ixyd was built for "
                    f"{lib.VFIO_API_VERSION}"
                )
            if _ioctl_value(self._fd, lib.VFIO_CHECK_EXTENSION, lib.VFIO_TYPE1v2_IOMMU):
                self.iommu_type = lib.VFIO_TYPE1v2_IOMMU
            elif _ioctl_value(self._fd, lib.VFIO_CHECK_EXTENSION, lib.VFIO_TYPE1_IOMMU):
                self.iommu_type = lib.VFIO_TYPE1_IOMMU
            else:
                raise VfioError(
                    "the kernel offers no type1 VFIO IOMMU: load vfio_iommu_type1 "
                    "(`modprobe vfio_iommu_type1`)"
                )
        except BaseException:
            os.close(self._fd)
            raise

    def _why_no_vfio(self, path: str) -> str:
        reasons = []
        if not self.sysfs.exists("module", "vfio") and not self.sysfs.exists(
            "bus", "pci", "drivers", "vfio-pci"
        ):
            reasons.append("the vfio modules are not loaded: run `modprobe vfio-pci`")
        if not self.sysfs.listdir("kernel", "iommu_groups"):
            reasons.append(
                "the kernel has no IOMMU groups: enable VT-d (AMD-Vi) in the firmware and "
                "boot with intel_iommu=on"
            )
        if not reasons:
            reasons.append("load vfio-pci and enable the IOMMU (intel_iommu=on)")
        return f"{path} does not exist, so VFIO is not available: " + "; ".join(reasons)

    # ------------------------------------------------------------ groups and devices
    def add_group(self, group: int) -> None:
        """Attach IOMMU group `group` (open /dev/vfio/<group>); a no-op if attached.

        Raises GroupNotViableError naming the devices that keep the group from being used,
        VfioError for a missing node, permissions, or a group owned by another process.
        """
        self._check_open()
        if group in self._groups:
            return
        path = os.path.join(self.vfio_dir, str(group))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioError(
                f"{path} does not exist: no device of IOMMU group {group} is bound to "
                f"vfio-pci; bind it first (ixyd.pci.bind_vfio)"
            ) from None
        except PermissionError:
            raise VfioError(
                f"permission denied opening {path}: run as root, or give this user the "
                f'group node (udev rule SUBSYSTEM=="vfio", GROUP="vfio", MODE="0660") and '
                f"raise its RLIMIT_MEMLOCK"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(
                    f"IOMMU group {group} is already open, by another process (another "
                    f"ixyd, QEMU, a DPDK application) or another VfioContainer of this one: "
                    f"a group has one owner at a time"
                ) from None
            raise VfioError(f"opening {path} failed: {exc.strerror}") from None
        try:
            status = _new("vfio_group_status")
            _ioctl(fd, lib.VFIO_GROUP_GET_STATUS, status)
            if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
                raise GroupNotViableError(self._not_viable_message(group))
            _ioctl(fd, lib.VFIO_GROUP_SET_CONTAINER, ffi.new("int *", self._fd))
        except OSError as exc:
            os.close(fd)
            raise VfioError(f"attaching IOMMU group {group} failed: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self._groups[group] = _Group(group, fd)
        try:
            self._after_attach(group)
        except BaseException:
            self._detach(group)
            raise

    def _not_viable_message(self, group: int) -> str:
        blockers = group_blockers(group, self.sysfs)
        if not blockers:
            return (
                f"IOMMU group {group} is not viable: some device in it is bound to a kernel "
                f"driver; bind every device of /sys/kernel/iommu_groups/{group}/devices to "
                f"vfio-pci"
            )
        detail = "; ".join(f"{addr} is bound to {driver}" for addr, driver in blockers)
        return (
            f"IOMMU group {group} is not viable: {detail}; bind it to vfio-pci "
            f"(ixyd.pci.bind_vfio_group binds the whole group)"
        )

    def _after_attach(self, group: int) -> None:
        if not self._iommu_set:
            try:
                _ioctl_value(self._fd, lib.VFIO_SET_IOMMU, self.iommu_type)
            except OSError as exc:
                raise VfioError(f"VFIO_SET_IOMMU(type1) failed: {exc.strerror}") from None
            self._iommu_set = True
        before = self._ranges
        self._read_iommu_info()
        if self._dma is not None and before is not None:
            lost = [
                r for r in before if not any(lo <= r[0] and r[1] <= hi for lo, hi in self._ranges)
            ]
            if lost:
                self._ranges = before  # add_group detaches the group again
                raise VfioError(
                    f"attaching IOMMU group {group} narrows the valid IOVA ranges after DMA "
                    f"memory was set up from them (lost {_ranges_text(lost)}); "
                    f"open every device before using the container's DMA memory"
                )

    def _read_iommu_info(self) -> None:
        info = _new("vfio_iommu_type1_info")
        try:
            _ioctl(self._fd, lib.VFIO_IOMMU_GET_INFO, info)
            needed = info.argsz
            buf = bytearray(max(needed, ffi.sizeof(info[0])))
            if needed > ffi.sizeof(info[0]):
                # The kernel asked for room for its capability chain: call again with it.
                view = ffi.from_buffer("struct vfio_iommu_type1_info *", buf)
                view.argsz = needed
                _ioctl(self._fd, lib.VFIO_IOMMU_GET_INFO, view)
            else:
                ffi.memmove(buf, info, ffi.sizeof(info[0]))
        except OSError as exc:
            raise VfioError(f"VFIO_IOMMU_GET_INFO failed: {exc.strerror}") from None
        head = ffi.from_buffer("struct vfio_iommu_type1_info *", buf)
        if head.flags & lib.VFIO_IOMMU_INFO_PGSIZES:
            self.iova_pgsizes = head.iova_pgsizes
        ranges = parse_iova_ranges(bytes(buf))
        if ranges is None:
            log.warning(
                "the kernel reports no valid IOVA ranges (type1 before Linux 5.4); using the "
                "conservative default %s",
                _ranges_text(FALLBACK_IOVA_RANGES),
            )
            ranges = list(FALLBACK_IOVA_RANGES)
        self._ranges = ranges

    def _detach(self, group: int) -> None:
        g = self._groups.pop(group)
        try:
            _ioctl_value(g.fd, lib.VFIO_GROUP_UNSET_CONTAINER)
        except OSError:
            pass  # closing the fd detaches it as well
        os.close(g.fd)
        if not self._groups:
            # The kernel drops the IOMMU with the last group: the next group sets it again.
            self._iommu_set = False

    def open_device(self, address: str) -> int:
        """Attach the device's group if needed and return a new device fd.

        This is the backend-specific half of opening a device; `VfioDevice` does the rest
        with ioctls that iommufd's device cdev shares.
        """
        self._check_open()
        address = parse_pci_address(address)
        group = self.sysfs.iommu_group(address)
        if group is None:
            if not self.sysfs.exists("bus", "pci", "devices", address):
                raise VfioError(f"no PCI device {address}; `lspci -D` lists the addresses present")
            raise VfioError(
                f"{address} has no IOMMU group: the IOMMU is off. Enable VT-d (AMD-Vi) in "
                f"the firmware and boot with intel_iommu=on"
            )
        self.add_group(group)
        try:
            return _ioctl(
                self._groups[group].fd,
                lib.VFIO_GROUP_GET_DEVICE_FD,
                ffi.new("char[]", address.encode()),
            )
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EBUSY:
                hint = ": it is already open (in this process or one sharing the group)"
            elif exc.errno in (errno.ENODEV, errno.EINVAL):
                hint = f": is {address} bound to vfio-pci?"
            raise VfioError(
                f"VFIO_GROUP_GET_DEVICE_FD for {address} (group {group}) failed: "
                f"{exc.strerror}{hint}"
            ) from None

    @property
    def groups(self) -> list[int]:
        """Numbers of the attached IOMMU groups."""
        return sorted(self._groups)

    # ------------------------------------------------------------ DmaMapper
    def valid_iova_ranges(self) -> list[tuple[int, int]]:
        """Inclusive IOVA ranges the IOMMU accepts for every attached group."""
        self._check_open()
        if self._ranges is None:
            raise VfioError("the container has no IOMMU yet: open a device (attach a group) first")
        return list(self._ranges)

    @property
    def dma(self) -> DmaMemory:
        """DMA memory mapped through this container, created at first use."""
        if self._dma is None:
            self._dma = DmaMemory(self, prefer_hugepages=self._prefer_hugepages)
        return self._dma

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """Map host memory [vaddr, vaddr+size) at `iova`, readable and writable by devices.

        Pins the pages (counted against RLIMIT_MEMLOCK). Raises MemlockLimitError when the
        limit is too low, VfioDmaError for any other refusal.
        """
        self._check_open()
        request = _new("vfio_iommu_type1_dma_map")
        request.flags = lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
        request.vaddr, request.iova, request.size = vaddr, iova, size
        try:
            _ioctl(self._fd, lib.VFIO_IOMMU_MAP_DMA, request)
        except OSError as exc:
            raise self._map_error(exc.errno, iova, size) from None
        self._mappings[iova] = Mapping(iova, size, vaddr)

    def _map_error(self, err: int, iova: int, size: int) -> VfioDmaError:
        where = f"VFIO_IOMMU_MAP_DMA of {_size(size)} at IOVA {iova:#x}"
        if err in (errno.ENOMEM, errno.EPERM):
            return MemlockLimitError(_memlock_message(where, size, self.mapped_bytes))
        if err == errno.EEXIST:
            return VfioDmaError(f"{where}: overlaps an existing mapping")
        if err == errno.ENOSPC:
            return VfioDmaError(
                f"{where}: the container has reached vfio_iommu_type1's dma_entry_limit "
                f"({len(self._mappings)} mappings); use larger chunks or raise the module "
                f"parameter"
            )
        if err == errno.EINVAL:
            return VfioDmaError(
                f"{where}: rejected as invalid (outside the valid IOVA ranges "
                f"{_ranges_text(self._ranges or [])}, or not "
                f"aligned to the IOMMU page size)"
            )
        return VfioDmaError(f"{where}: {os.strerror(err)}")

    def unmap_dma(self, iova: int, size: int) -> None:
        """Remove a mapping made by `map_dma` with the same iova and size."""
        self._check_open()
        mapping = self._mappings.get(iova)
        if mapping is None or mapping.size != size:
            raise VfioDmaError(f"no DMA mapping of {_size(size)} at IOVA {iova:#x} to unmap")
        request = _new("vfio_iommu_type1_dma_unmap")
        request.iova, request.size = iova, size
        try:
            _ioctl(self._fd, lib.VFIO_IOMMU_UNMAP_DMA, request)
        except OSError as exc:
            raise VfioDmaError(
                f"VFIO_IOMMU_UNMAP_DMA of {_size(size)} at IOVA {iova:#x}: {exc.strerror}"
            ) from None
        del self._mappings[iova]
        if request.size != size:  # the kernel reports what it actually unmapped
            raise VfioDmaError(
                f"VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x} unmapped {request.size:#x} bytes, "
                f"expected {size:#x}"
            )

    @property
    def mappings(self) -> list[Mapping]:
        """Every DMA mapping this container holds, by IOVA."""
        return [self._mappings[iova] for iova in sorted(self._mappings)]

    @property
    def mapped_bytes(self) -> int:
        """Bytes currently mapped (and pinned) through this container."""
        return sum(m.size for m in self._mappings.values())

    # ------------------------------------------------------------ lifetime
    def _register(self, device: VfioDevice) -> None:
        self._devices.append(device)

    def _unregister(self, device: VfioDevice) -> None:
        if device in self._devices:
            self._devices.remove(device)

    def _check_open(self) -> None:
        if self.closed:
            raise VfioError("the VFIO container is closed")

    def close(self) -> None:
        """Close open devices (stopping their DMA), unmap everything, close all fds.

        Raises VfioDmaError at the end if some mapping could not be removed; everything
        else is still released.
        """
        if self.closed:
            return
        errors: list[Exception] = []
        for device in list(self._devices):
            try:
                device.close()
            except Exception as exc:
                errors.append(exc)
        if self._dma is not None:
            try:
                self._dma.close()
            except Exception as exc:
                errors.append(exc)
        for mapping in self.mappings:
            try:
                self.unmap_dma(mapping.iova, mapping.size)
            except Exception as exc:
                errors.append(exc)
        for group in list(self._groups):
            self._detach(group)
        os.close(self._fd)
        self.closed = True
        self._mappings.clear()  # the kernel drops whatever is left with the last group
        if errors:
            raise VfioDmaError(
                f"closing the VFIO container: {len(errors)} error(s), first: {errors[0]}"
            )

    def __enter__(self) -> VfioContainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"groups {self.groups}, {len(self._mappings)} mappings"
        return f"<VfioContainer {state}>"


def _memlock_message(where: str, size: int, already_mapped: int) -> str:
    """Explain a MAP_DMA refused for RLIMIT_MEMLOCK: the limit, what is needed, the fix."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else _size(soft)
    needed = already_mapped + size
    return (
        f"{where}: the kernel refused to pin the pages: RLIMIT_MEMLOCK is {limit} and this "
        f"process needs at least {_size(needed)} locked ({_size(already_mapped)} already "
        f"mapped + {_size(size)}). Raise it: `ulimit -l`, LimitMEMLOCK= in the systemd unit, "
        f"/etc/security/limits.conf, or run with CAP_IPC_LOCK"
    )


class VfioDevice(PciFunction):
    """One PCI function opened through VFIO: BAR0 mapped, config space, reset, IRQ info.

    Open with `VfioDevice.open(address, container)`. BAR0 must be mappable (true for
    Intel NICs). Raises VfioError when the device cannot be opened.
    """

    def __init__(self, address: str, container: VfioContainer):
        self.address = parse_pci_address(address)
        self.container = container
        self._bar = None
        self._closed = False
        self._fd = container.open_device(self.address)
        try:
            info = _new("vfio_device_info")
            self._device_ioctl(lib.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
            if not info.flags & lib.VFIO_DEVICE_FLAGS_PCI:
                raise VfioError(f"{self.address}: VFIO does not present it as a PCI device")
            self.flags = info.flags
            self.num_regions, self.num_irqs = info.num_regions, info.num_irqs
            config = self.region_info(lib.VFIO_PCI_CONFIG_REGION_INDEX)
            self._config_offset, self._config_size = config.offset, config.size
            bar0 = self.region_info(lib.VFIO_PCI_BAR0_REGION_INDEX)
            mmappable = (
                lib.VFIO_REGION_INFO_FLAG_READ
                | lib.VFIO_REGION_INFO_FLAG_WRITE
                | lib.VFIO_REGION_INFO_FLAG_MMAP
            )
            if bar0.size == 0 or bar0.flags & mmappable != mmappable:
                raise VfioError(
                    f"{self.address}: BAR0 cannot be mapped (size {bar0.size:#x}, flags "
                    f"{bar0.flags:#x}); ixyd needs a memory BAR0 it can mmap"
                )
            error = ffi.new("int *")
            bar = lib.ixyd_vfio_mmap(self._fd, bar0.size, bar0.offset, error)
            if bar == ffi.NULL:
                raise VfioError(f"{self.address}: mmap of BAR0 failed: {os.strerror(error[0])}")
            self._bar = ffi.cast("volatile uint32_t *", bar)
            self.bar0_size = bar0.size
            self.ids = self._read_ids()
        except BaseException:
            self._release()
            raise
        container._register(self)

    @classmethod
    def open(cls, address: str, container: VfioContainer) -> VfioDevice:
        """Open `address` (bound to vfio-pci) through `container`."""
        return cls(address, container)

    def _device_ioctl(self, request: int, arg, name: str) -> int:
        try:
            return _ioctl(self._fd, request, arg)
        except OSError as exc:
            raise VfioError(f"{self.address}: {name} failed: {exc.strerror}") from None

    # ------------------------------------------------------------ the seam
    @property
    def dma(self) -> DmaMemory:
        """DMA memory of the container (shared by every device in it)."""
        return self.container.dma

    def read32(self, offset: int) -> int:
        self.check_offset(offset)
        if self._bar is None:
            return ALL_ONES  # closed: like a removed device, as the model does
        return lib.ixyd_vfio_read32(self._bar, offset)

    def write32(self, offset: int, value: int) -> None:
        self.check_offset(offset)
        if not 0 <= value <= ALL_ONES:
            raise ValueError(
                f"{self.address}: register value {value!r} is not a 32-bit unsigned integer"
            )
        if self._bar is None:
            return
        lib.ixyd_vfio_write32(self._bar, offset, value)

    @property
    def regs_address(self) -> int:
        if self._bar is None:
            raise VfioError(f"{self.address} is closed: BAR0 is no longer mapped")
        return int(ffi.cast("uintptr_t", self._bar))

    def set_bus_master(self, enabled: bool) -> None:
        """Set or clear PCI_COMMAND Bus Master Enable; vfio-pci leaves it off on open."""
        command = self.read_config(lib.PCI_COMMAND, 2)
        wanted = command | lib.PCI_COMMAND_MASTER if enabled else command & ~lib.PCI_COMMAND_MASTER
        if wanted != command:
            self.write_config(lib.PCI_COMMAND, 2, wanted)

    @property
    def bus_master(self) -> bool:
        return bool(self.read_config(lib.PCI_COMMAND, 2) & lib.PCI_COMMAND_MASTER)

    # ------------------------------------------------------------ config space
    def read_config(self, offset: int, size: int) -> int:
        """Read a 1-, 2- or 4-byte little-endian register of PCI config space."""
        self._check_config(offset, size)
        try:
            data = os.pread(self._fd, size, self._config_offset + offset)
        except OSError as exc:
            raise VfioError(f"{self.address}: config read at {offset:#x}: {exc.strerror}") from None
        if len(data) != size:
            raise VfioError(f"{self.address}: short config read at {offset:#x}")
        return int.from_bytes(data, "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write a 1-, 2- or 4-byte register of PCI config space (vfio-pci filters writes)."""
        self._check_config(offset, size)
        try:
            written = os.pwrite(
                self._fd, value.to_bytes(size, "little"), self._config_offset + offset
            )
        except OSError as exc:
            raise VfioError(
                f"{self.address}: config write at {offset:#x}: {exc.strerror}"
            ) from None
        if written != size:
            raise VfioError(f"{self.address}: short config write at {offset:#x}")

    def _check_config(self, offset: int, size: int) -> None:
        if self._closed:
            raise VfioError(f"{self.address} is closed")
        if (
            size not in _CONFIG_SIZES
            or offset % size
            or not 0 <= offset <= self._config_size - size
        ):
            raise ValueError(
                f"{self.address}: config access of {size} bytes at {offset:#x} is not an "
                f"aligned 1/2/4-byte access inside {self._config_size:#x} bytes"
            )

    def find_capability(self, cap_id: int) -> int | None:
        """Config-space offset of a PCI capability (e.g. PCI_CAP_ID_EXP), None if absent."""
        if not self.read_config(lib.PCI_STATUS, 2) & lib.PCI_STATUS_CAP_LIST:
            return None
        offset = self.read_config(lib.PCI_CAPABILITY_LIST, 1) & ~3
        for _ in range(48):  # at most 48 capabilities fit in 192 bytes: stops a looped list
            if offset < 0x40:
                return None
            if self.read_config(offset + lib.PCI_CAP_LIST_ID, 1) == cap_id:
                return offset
            offset = self.read_config(offset + lib.PCI_CAP_LIST_NEXT, 1) & ~3
        return None

    @property
    def transactions_pending(self) -> bool:
        """PCIe Device Status: Transactions Pending (poll it after master disable)."""
        pcie = self.find_capability(lib.PCI_CAP_ID_EXP)
        if pcie is None:
            return False
        return bool(self.read_config(pcie + lib.PCI_EXP_DEVSTA, 2) & lib.PCI_EXP_DEVSTA_TRPND)

    def _read_ids(self) -> PciIds:
        class_revision = self.read_config(lib.PCI_CLASS_REVISION, 4)
        return PciIds(
            vendor_id=self.read_config(lib.PCI_VENDOR_ID, 2),
            device_id=self.read_config(lib.PCI_DEVICE_ID, 2),
            subsystem_vendor_id=self.read_config(lib.PCI_SUBSYSTEM_VENDOR_ID, 2),
            subsystem_id=self.read_config(lib.PCI_SUBSYSTEM_ID, 2),
            revision=class_revision & 0xFF,
            class_code=class_revision >> 8,
        )

    # ------------------------------------------------------------ regions, IRQs, reset
    def region_info(self, index: int):
        """VFIO_DEVICE_GET_REGION_INFO for one region index (flags, size, offset)."""
        info = _new("vfio_region_info")
        info.index = index
        self._device_ioctl(lib.VFIO_DEVICE_GET_REGION_INFO, info, f"GET_REGION_INFO({index})")
        return info

    def irq_info(self, index: int) -> IrqInfo:
        """What an interrupt index offers, e.g. VFIO_PCI_MSIX_IRQ_INDEX: count and flags."""
        info = _new("vfio_irq_info")
        info.index = index
        self._device_ioctl(lib.VFIO_DEVICE_GET_IRQ_INFO, info, f"GET_IRQ_INFO({index})")
        return IrqInfo(index, info.count, info.flags)

    @property
    def msix_info(self) -> IrqInfo:
        return self.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX)

    @property
    def reset_supported(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_RESET)

    def reset(self) -> None:
        """Function-level reset through VFIO_DEVICE_RESET (FLR, PM or bus reset).

        Raises VfioError when the device offers no reset method; reset it through its own
        control register then (82599 CTRL.RST).
        """
        if not self.reset_supported:
            raise VfioError(
                f"{self.address}: VFIO offers no reset for this device (no FLR, PM or bus "
                f"reset); use the device's own software reset"
            )
        try:
            _ioctl_value(self._fd, lib.VFIO_DEVICE_RESET)
        except OSError as exc:
            raise VfioError(f"{self.address}: VFIO_DEVICE_RESET failed: {exc.strerror}") from None

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the device's DMA (bus master off), unmap BAR0, close the device fd.

        The group stays attached to the container until the container is closed.
        """
        if self._closed:
            return
        try:
            self.set_bus_master(False)
        except VfioError as exc:
            log.warning("%s: could not clear bus master on close: %s", self.address, exc)
        self._release()
        self.container._unregister(self)

    def _release(self) -> None:
        if self._bar is not None:
            lib.ixyd_vfio_munmap(ffi.cast("void *", self._bar), self.bar0_size)
            self._bar = None
        if not self._closed:
            os.close(self._fd)
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed
