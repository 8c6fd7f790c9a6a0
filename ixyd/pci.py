"""PCI device facts and driver binding through sysfs: hand a NIC to vfio-pci, and give it back.

Binding follows driverctl and DPDK's advice (anchors.md 2.3 and 7): `driver_override` plus
`drivers_probe`, never `new_id`, which would grab every card with the same vendor:device
ID. Before a kernel driver is unbound, its network interfaces are checked: one that is up
with a routable address is in use, and taking it away would cut someone's connection, so
that is refused unless forced (dpdk-devbind's "Active" check).

All sysfs paths hang off a configurable root (default /sys) so tests can run against a
fake tree. Interface state is read and changed over netlink with pyroute2.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field

from .device import parse_pci_address
from .errors import DeviceError

__all__ = [
    "Binding",
    "NetdevInUseError",
    "NetdevState",
    "PciBindError",
    "PciDeviceInfo",
    "Sysfs",
    "bind_vfio",
    "bind_vfio_group",
    "check_netdevs_idle",
    "group_blockers",
    "netdev_state",
    "parse_pci_address",
    "release",
]

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"
# Drivers that may sit in a VFIO group without making it non-viable: they never start DMA
# of their own (kernel: driver_managed_dma, or the pre-5.19 allow list plus bridges).
VFIO_COMPATIBLE_DRIVERS = frozenset({VFIO_PCI, "pci-stub", "pcieport"})
IFF_UP = 0x1  # <linux/if.h>
BIND_TIMEOUT = 2.0  # seconds to wait for a probe to show in sysfs (it is synchronous for igb/ixgbe)


class PciBindError(DeviceError):
    """A device could not be bound to vfio-pci or returned to its kernel driver."""


class NetdevInUseError(PciBindError):
    """A network interface of the device is up with an address: someone is using it."""


class Sysfs:
    """The few sysfs operations binding needs, below a root directory (default /sys)."""

    def __init__(self, root: str = "/sys"):
        self.root = root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts))

    def read(self, *parts: str) -> str | None:
        """Stripped content of a sysfs attribute, None when it does not exist."""
        try:
            with open(self.path(*parts)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def write(self, text: str, *parts: str) -> None:
        """Write one value to a sysfs attribute, as `echo -n text > attribute` would."""
        path = self.path(*parts)
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise PciBindError(
                f"writing {text.strip()!r} to {path} failed: {exc.strerror}; "
                f"this needs root, and the kernel log (dmesg) may say more"
            ) from exc

    def link_name(self, *parts: str) -> str | None:
        """Last component of a symlink's target (a driver or group name), None if absent."""
        try:
            return os.path.basename(os.readlink(self.path(*parts)))
        except OSError:  # absent, or not a symlink
            return None

    def listdir(self, *parts: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(*parts)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -------------------------------------------------------------- PCI facts
    def device_dir(self, address: str) -> str:
        return self.path("bus", "pci", "devices", address)

    def driver(self, address: str) -> str | None:
        """Name of the driver bound to the device, None when unbound."""
        return self.link_name("bus", "pci", "devices", address, "driver")

    def iommu_group(self, address: str) -> int | None:
        """IOMMU group number of the device, None when the IOMMU is off."""
        name = self.link_name("bus", "pci", "devices", address, "iommu_group")
        return int(name) if name is not None else None

    def group_members(self, group: int) -> list[str]:
        """Addresses of every device in an IOMMU group."""
        return self.listdir("kernel", "iommu_groups", str(group), "devices")

    def netdevs(self, address: str) -> list[str]:
        """Kernel network interfaces of the device (empty when no net driver is bound)."""
        return self.listdir("bus", "pci", "devices", address, "net")


@dataclass(frozen=True)
class PciDeviceInfo:
    """What sysfs says about one PCI function."""

    address: str
    vendor_id: int
    device_id: int
    class_code: int
    iommu_group: int | None
    #: every device in the same IOMMU group, this one included
    group_members: tuple[str, ...]
    #: bound driver, None when unbound
    driver: str | None
    netdevs: tuple[str, ...]

    @classmethod
    def read(cls, address: str, sysfs: Sysfs | None = None) -> PciDeviceInfo:
        """Collect the facts of `address`; raises PciBindError when there is no such device."""
        sysfs = sysfs or Sysfs()
        address = parse_pci_address(address)
        if not os.path.isdir(sysfs.device_dir(address)):
            raise PciBindError(
                f"no PCI device {address} ({sysfs.device_dir(address)} does not exist); "
                f"`lspci -D` lists the addresses present"
            )

        def hex_attribute(name: str) -> int:
            value = sysfs.read("bus", "pci", "devices", address, name)
            return int(value, 16) if value else 0

        group = sysfs.iommu_group(address)
        return cls(
            address=address,
            vendor_id=hex_attribute("vendor"),
            device_id=hex_attribute("device"),
            class_code=hex_attribute("class"),
            iommu_group=group,
            group_members=tuple(sysfs.group_members(group)) if group is not None else (),
            driver=sysfs.driver(address),
            netdevs=tuple(sysfs.netdevs(address)),
        )


def group_blockers(group: int, sysfs: Sysfs | None = None, exclude=()) -> list[tuple[str, str]]:
    """Devices of an IOMMU group that keep it from being viable for VFIO.

    Returns (address, driver) for every member bound to a driver that does its own DMA,
    i.e. not vfio-pci, pci-stub or pcieport; addresses in `exclude` are skipped.
    """
    sysfs = sysfs or Sysfs()
    blockers = []
    for member in sysfs.group_members(group):
        if member in exclude:
            continue
        driver = sysfs.driver(member)
        if driver is not None and driver not in VFIO_COMPATIBLE_DRIVERS:
            blockers.append((member, driver))
    return blockers


# ------------------------------------------------------------------ network interfaces
@dataclass(frozen=True)
class NetdevState:
    """Netlink view of one interface: admin state and its routable addresses."""

    name: str
    up: bool
    #: "address/prefixlen", link-local (169.254/16, fe80::/10) left out
    addresses: tuple[str, ...] = field(default=())

    @property
    def in_use(self) -> bool:
        """Up with a routable address: traffic may be flowing through it."""
        return self.up and bool(self.addresses)


def _netlink(netns: str | None):
    from pyroute2 import IPRoute, NetNS  # imported on use: pyroute2 takes ~0.2 s to import

    return NetNS(netns) if netns else IPRoute()


def netdev_state(ipr, ifname: str) -> NetdevState | None:
    """Read an interface's state through an open pyroute2 IPRoute/NetNS; None if absent."""
    indexes = ipr.link_lookup(ifname=ifname)
    if not indexes:
        return None
    index = indexes[0]
    link = ipr.get_links(index)[0]
    addresses = []
    for msg in ipr.get_addr(index=index):
        text = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
        if text is None or ipaddress.ip_address(text.split("%")[0]).is_link_local:
            continue
        addresses.append(f"{text}/{msg['prefixlen']}")
    return NetdevState(ifname, bool(link["flags"] & IFF_UP), tuple(addresses))


def check_netdevs_idle(
    address: str, ifnames, *, force: bool = False, netns: str | None = None
) -> list[NetdevState]:
    """Refuse to take a device whose interfaces are up with a routable address.

    Returns the state of each interface found. Raises NetdevInUseError naming every
    interface in use and its addresses, unless `force`. Interfaces that netlink does not
    know (another namespace) are skipped. `netns` selects a named network namespace.
    """
    ifnames = list(ifnames)
    if not ifnames:
        return []
    with _netlink(netns) as ipr:
        states = [s for s in (netdev_state(ipr, name) for name in ifnames) if s is not None]
    busy = [s for s in states if s.in_use]
    if busy and not force:
        detail = "; ".join(f"{s.name} is up with {', '.join(s.addresses)}" for s in busy)
        raise NetdevInUseError(
            f"{address} is in use by the kernel: {detail}. Move the addresses away and "
            f"`ip link set {busy[0].name} down` first, or pass force=True to take it anyway"
        )
    return states


def set_netdevs_down(ifnames, *, netns: str | None = None) -> None:
    """Set interfaces administratively down before their driver is unbound."""
    with _netlink(netns) as ipr:
        for name in ifnames:
            indexes = ipr.link_lookup(ifname=name)
            if indexes:
                ipr.link("set", index=indexes[0], state="down")
                log.info("set %s down", name)


# ------------------------------------------------------------------ binding
@dataclass(frozen=True)
class Binding:
    """A device handed to vfio-pci, and what it had before."""

    address: str
    #: driver bound before (None: unbound, or it was already on vfio-pci)
    original_driver: str | None
    #: its interfaces at the time, set down before the unbind
    netdevs: tuple[str, ...]
    iommu_group: int


# Originals of the devices this process bound, so release() can check the driver came back.
_bindings: dict[str, Binding] = {}


def _require_vfio_pci(sysfs: Sysfs) -> None:
    if not sysfs.exists("bus", "pci", "drivers", VFIO_PCI):
        raise PciBindError(
            f"the vfio-pci driver is not loaded ({sysfs.path('bus', 'pci', 'drivers', VFIO_PCI)} "
            f"does not exist): run `modprobe vfio-pci` (add it to /etc/modules-load.d/ to "
            f"load it at boot)"
        )


def _wait_for_driver(sysfs: Sysfs, address: str, wanted: str | None, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        driver = sysfs.driver(address)
        if driver == wanted or time.monotonic() >= deadline:
            return driver
        time.sleep(0.01)


def bind_vfio(
    address: str,
    force: bool = False,
    *,
    sysfs: Sysfs | None = None,
    netns: str | None = None,
    timeout: float = BIND_TIMEOUT,
) -> Binding:
    """Bind one PCI function to vfio-pci, taking it from its kernel driver if it has one.

    Checks first, changes nothing until all pass: the device exists, vfio-pci is loaded,
    the device has an IOMMU group, no other member of that group is bound to a DMA-capable
    kernel driver (use `bind_vfio_group` for multi-function groups), and none of its
    interfaces is up with a routable address. `force` skips the last two checks. Then its
    interfaces are set down, `driver_override` is set to vfio-pci, the old driver is
    unbound and `drivers_probe` binds vfio-pci. Idempotent.

    Raises PciBindError (NetdevInUseError for a busy interface).
    """
    sysfs = sysfs or Sysfs()
    info = PciDeviceInfo.read(address, sysfs)
    address = info.address
    _require_vfio_pci(sysfs)
    if info.iommu_group is None:
        raise PciBindError(
            f"{address} has no IOMMU group: the IOMMU is off. Enable VT-d (AMD-Vi) in the "
            f"firmware and boot with intel_iommu=on (AMD: on by default)"
        )
    # The group check comes first, also for a device already on vfio-pci: its group is
    # no more usable than before while another member sits on a kernel driver.
    blockers = group_blockers(info.iommu_group, sysfs, exclude=(address,))
    if blockers and not force:
        others = ", ".join(f"{a} (bound to {d})" for a, d in blockers)
        raise PciBindError(
            f"{address} shares IOMMU group {info.iommu_group} with {others}: VFIO can only "
            f"use the group when all of its devices are on vfio-pci. Use "
            f"bind_vfio_group({address!r}) to bind them all, or force=True"
        )
    if info.driver == VFIO_PCI:
        return _bindings.setdefault(address, Binding(address, None, (), info.iommu_group))
    if info.driver is not None:
        check_netdevs_idle(address, info.netdevs, force=force, netns=netns)
        set_netdevs_down(info.netdevs, netns=netns)

    # Override first, so nothing can re-probe the old driver between unbind and probe.
    sysfs.write(VFIO_PCI, "bus", "pci", "devices", address, "driver_override")
    if info.driver is not None:
        sysfs.write(address, "bus", "pci", "devices", address, "driver", "unbind")
    sysfs.write(address, "bus", "pci", "drivers_probe")
    now = _wait_for_driver(sysfs, address, VFIO_PCI, timeout)
    if now != VFIO_PCI:
        raise PciBindError(
            f"{address} did not bind to vfio-pci (its driver is now {now or 'none'}); the "
            f"kernel log (dmesg) says why. ixyd.pci.release({address!r}) gives it back"
        )
    binding = Binding(address, info.driver, info.netdevs, info.iommu_group)
    _bindings[address] = binding
    log.info("%s: bound to vfio-pci (was %s)", address, info.driver or "unbound")
    return binding


def bind_vfio_group(
    address: str,
    force: bool = False,
    *,
    sysfs: Sysfs | None = None,
    netns: str | None = None,
    timeout: float = BIND_TIMEOUT,
) -> list[Binding]:
    """Bind `address` and every member of its IOMMU group that blocks VFIO to vfio-pci.

    Members that are unbound or on pcieport/pci-stub stay as they are (they do not stop
    the group from being viable). Every member's interfaces are checked, as in
    `bind_vfio`, before any device is touched.
    """
    sysfs = sysfs or Sysfs()
    info = PciDeviceInfo.read(address, sysfs)
    members = [info.address]
    if info.iommu_group is not None:
        members += [a for a, _ in group_blockers(info.iommu_group, sysfs, exclude=members)]
    for member in members:
        if sysfs.driver(member) not in (None, VFIO_PCI):
            check_netdevs_idle(member, sysfs.netdevs(member), force=force, netns=netns)
    # Force only the group check: every member's interfaces were checked above.
    return [bind_vfio(m, force=True, sysfs=sysfs, netns=netns, timeout=timeout) for m in members]


def _open_group_fds(group: int) -> list[int]:
    """File descriptors of this process that hold /dev/vfio/<group> open."""
    fds = []
    target = f"/dev/vfio/{group}"
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                fds.append(int(name))
        except OSError:
            continue
    return fds


def release(
    address: str,
    *,
    sysfs: Sysfs | None = None,
    timeout: float = BIND_TIMEOUT,
    previous: Binding | None = None,
) -> list[str]:
    """Take a device from vfio-pci and let the kernel bind its own driver again.

    Unbinds vfio-pci, clears `driver_override` and writes the address to `drivers_probe`,
    so the driver that matches the device (the original one, if its module is loaded)
    takes it back. Returns the names of the network interfaces that appeared, waiting up
    to `timeout` seconds for them when the device had interfaces before it was bound.
    The VFIO container using the device must be closed first: vfio-pci blocks the unbind
    while the device is open, and the kernel refuses the old driver while the group is.
    `previous`: the binding when another process made it (ixyd-host prepare), so that
    the original driver and interfaces are waited for as for this process's own.
    """
    sysfs = sysfs or Sysfs()
    info = PciDeviceInfo.read(address, sysfs)
    address = info.address
    if info.iommu_group is not None and _open_group_fds(info.iommu_group):
        raise PciBindError(
            f"{address}: this process still holds /dev/vfio/{info.iommu_group} open; close "
            f"the VfioContainer (and its devices) before releasing the device"
        )
    binding = _bindings.pop(address, None) or previous
    if info.driver == VFIO_PCI:
        sysfs.write(address, "bus", "pci", "devices", address, "driver", "unbind")
    # "\n" clears the override (Documentation/ABI/testing/sysfs-bus-pci).
    sysfs.write("\n", "bus", "pci", "devices", address, "driver_override")
    sysfs.write(address, "bus", "pci", "drivers_probe")

    original = binding.original_driver if binding else None
    driver = _wait_for_driver(sysfs, address, original, timeout if original else 0.0)
    if original and driver != original:
        log.warning(
            "%s: %s did not take the device back (driver now %s); is its module loaded?",
            address,
            original,
            driver or "none",
        )
    wait_for_netdevs = bool(binding and binding.netdevs)
    deadline = time.monotonic() + (timeout if wait_for_netdevs else 0.0)
    while True:
        names = sysfs.netdevs(address)
        if names or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    log.info("%s: released to %s, interfaces %s", address, driver or "no driver", names)
    return names
