"""PCI device facts and driver binding through sysfs: hand a NIC to vfio-pci, and give it back.

Binding follows driverctl and DPDK's advice (docs/reference/peers.md#binding-a-device):
`driver_override` plus `drivers_probe`, never `new_id`, which would grab every card with the
same vendor:device ID. Before a kernel driver is unbound, its network interfaces are
checked: one that is up with a routable address, or that other interfaces are stacked on (a
bridge or bond port, the lower device of a VLAN or macvlan), is in use, and taking it away
would cut someone's connection, so that is refused unless forced (dpdk-devbind's "Active"
check, extended). The interfaces are looked for in every network namespace, since one moved
into a container's namespace is no longer listed in this namespace's sysfs
(`check_netdevs_idle`).

All sysfs paths hang off a configurable root (default /sys) so tests can run against a
fake tree. Interface state is read and changed over netlink with pyroute2.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import threading
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
    "network_namespaces",
    "parse_pci_address",
    "release",
]

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"
# Drivers that may sit in a VFIO group without making it non-viable: they never start DMA
# of their own (kernel: driver_managed_dma, or the pre-5.19 allow list plus bridges).
VFIO_COMPATIBLE_DRIVERS = frozenset({VFIO_PCI, "pci-stub", "pcieport"})
IFF_UP = 0x1  # <linux/if.h>
CLONE_NEWNET = 0x40000000  # <linux/sched.h>: setns(2) into a network namespace
NETNSA_NSID_NOT_ASSIGNED = 0xFFFFFFFF  # RTM_GETNSID's -1 as pyroute2 returns it (u32)
# Interfaces made in pairs: each names the other in IFLA_LINK, which is not stacking.
PEER_KINDS = frozenset({"veth", "vxcan", "netkit"})
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
    """Netlink view of one interface: admin state, routable addresses, what is stacked on
    it and where it is."""

    name: str
    up: bool
    #: "address/prefixlen", link-local (169.254/16, fe80::/10) left out
    addresses: tuple[str, ...] = field(default=())
    #: what uses it as a lower device: "port of bridge br0", "lower of vlan eth0.5"
    stacked: tuple[str, ...] = field(default=())
    #: the network namespace it is in (a path naming it), None for this process's
    netns: str | None = None

    @property
    def in_use(self) -> bool:
        """Up with a routable address (traffic may be flowing through it), or other
        interfaces are stacked on it (taking it breaks them, addresses or not)."""
        return (self.up and bool(self.addresses)) or bool(self.stacked)

    def describe(self) -> str:
        """Why it is in use, for a message: "eth0 is up with 192.0.2.1/24, is a port of
        bridge br0 (in network namespace /run/netns/blue)"."""
        reasons = [f"is up with {', '.join(self.addresses)}"] if self.up and self.addresses else []
        reasons += [f"is a {what}" for what in self.stacked]
        where = f" (in network namespace {self.netns})" if self.netns else ""
        return f"{self.name} {', '.join(reasons)}{where}"


def _routable_addresses(ipr, index: int) -> tuple[str, ...]:
    addresses = []
    for msg in ipr.get_addr(index=index):
        text = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
        if text is None or ipaddress.ip_address(text.split("%")[0]).is_link_local:
            continue
        addresses.append(f"{text}/{msg['prefixlen']}")
    return tuple(addresses)


# ------------------------------------------------------------------ every network namespace
OWN_NETNS = "/proc/self/ns/net"


def _unescape_mountinfo(field_text: str) -> str:
    """proc(5) mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def network_namespaces(proc: str = "/proc") -> list[str]:
    """One path for every network namespace this process can find, its own first
    (OWN_NETNS): the network namespaces mounted in its mount table (`ip netns add` puts
    them in /run/netns, container runtimes elsewhere), then /proc/<pid>/ns/net of every
    process not in one already found. Not found: a namespace kept only by an open file
    descriptor or a mount in another mount namespace, with no process in it."""
    seen: set[tuple[int, int]] = set()
    paths: list[str] = []

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:  # the process exited, or the mount went away
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            paths.append(path)

    add(OWN_NETNS)
    try:
        with open(os.path.join(proc, "self", "mountinfo")) as f:
            mounts = f.read().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        # an nsfs mount of a network namespace has the root "net:[<inode>]"
        if fs.split()[:1] == ["nsfs"] and len(parts) > 4 and parts[3].startswith("net:["):
            add(_unescape_mountinfo(parts[4]))
    for entry in sorted(os.listdir(proc), key=lambda e: (len(e), e)):
        if entry.isdigit():
            add(os.path.join(proc, entry, "ns", "net"))
    return paths


_libc = None


def _netlink_in(path: str):
    """A pyroute2 IPRoute on a netlink socket made inside the network namespace `path`.
    A socket stays in the namespace it was made in, so a short-lived thread enters the
    namespace (setns(2) changes only the calling thread's), makes the socket and ends."""
    from pyroute2 import IPRoute  # imported on use: pyroute2 takes ~0.2 s to import

    if path == OWN_NETNS:
        return IPRoute()
    global _libc
    _libc = _libc or ctypes.CDLL(None, use_errno=True)
    made: dict = {}

    def make() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, os.strerror(error), path)
            finally:
                os.close(fd)
            made["socket"] = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0
            )
        except OSError as exc:
            made["error"] = exc

    thread = threading.Thread(target=make, name="ixyd-netns")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return IPRoute(use_socket=made["socket"])


@dataclass
class _Namespace:
    path: str
    ipr: object  # pyroute2 IPRoute in that namespace
    links: list  # its RTM_NEWLINK messages
    fd: int  # open on `path`, for RTM_GETNSID questions about it

    def by_index(self, index: int):
        return next((link for link in self.links if link["index"] == index), None)


def _kind(link) -> str:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "interface"


def _open_namespaces(home: str) -> list[_Namespace]:
    paths = network_namespaces()
    if not any(os.path.samefile(home, p) for p in paths if os.path.exists(p)):
        paths.insert(1, home)
    opened = []
    for path in paths:
        fd = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            ipr = _netlink_in(path)
            opened.append(_Namespace(path, ipr, list(ipr.get_links()), fd))
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            if exc.errno not in (errno.ENOENT, errno.ESRCH):  # not: gone since it was listed
                log.warning("cannot look into network namespace %s: %s", path, exc)
    return opened


def _nsid(ns: _Namespace, other: _Namespace) -> int | None:
    """The id `ns` gives `other` (what IFLA_LINK_NETNSID says in `ns`), None if none."""
    answer = ns.ipr.get_netnsid(fd=other.fd) or {}
    nsid = answer.get("nsid")
    return None if nsid is None or nsid in (-1, NETNSA_NSID_NOT_ASSIGNED) else nsid


def _stacked_on(target, home: _Namespace, namespaces: list[_Namespace]) -> list[str]:
    """What uses `target` (a link in `home`) as its lower device, in any namespace."""
    found = []
    master = target.get_attr("IFLA_MASTER")
    if master:
        upper = home.by_index(master)
        name = upper.get_attr("IFLA_IFNAME") if upper else f"#{master}"
        found.append(f"port of {_kind(upper) if upper else 'master'} {name}")
    for ns in namespaces:
        nsid = None if ns is home else _nsid(ns, home)
        for link in ns.links:
            if link is target or link.get_attr("IFLA_LINK") != target["index"]:
                continue
            if _kind(link) in PEER_KINDS:
                continue
            link_nsid = link.get_attr("IFLA_LINK_NETNSID")
            # same namespace: no IFLA_LINK_NETNSID; another: the id it gives `home`
            if (ns is home and link_nsid is None) or (
                ns is not home and link_nsid is not None and link_nsid == nsid
            ):
                where = "" if ns is home else f" in network namespace {ns.path}"
                found.append(f"lower of {_kind(link)} {link.get_attr('IFLA_IFNAME')}{where}")
    return found


def netdevs_everywhere(address: str, ifnames=(), *, netns: str | None = None) -> list[NetdevState]:
    """The kernel interfaces of PCI function `address` in every network namespace
    (network_namespaces): the links whose parent device is `address` on the PCI bus
    (IFLA_PARENT_DEV_NAME, Linux 5.16 and later), plus `ifnames` looked up by name in
    `netns` (a name in /run/netns; default this process's namespace), which is how the
    device's sysfs `net/` directory names them. Each with its state and what is stacked
    on it (a bridge or bond it is a port of, VLAN/macvlan/... devices on it, in its
    namespace or another one)."""
    home_path = os.path.join("/run/netns", netns) if netns else OWN_NETNS
    namespaces = _open_namespaces(home_path)
    try:
        home = next((ns for ns in namespaces if os.path.samefile(ns.path, home_path)), None)
        states = []
        for ns in namespaces:
            for link in ns.links:
                name = link.get_attr("IFLA_IFNAME")
                ours = (
                    link.get_attr("IFLA_PARENT_DEV_BUS_NAME") == "pci"
                    and link.get_attr("IFLA_PARENT_DEV_NAME") == address
                ) or (ns is home and name in ifnames)
                if not ours:
                    continue
                states.append(
                    NetdevState(
                        name,
                        bool(link["flags"] & IFF_UP),
                        _routable_addresses(ns.ipr, link["index"]),
                        tuple(_stacked_on(link, ns, namespaces)),
                        None if ns.path == OWN_NETNS else ns.path,
                    )
                )
        # as the caller named them, then the ones found by their parent device
        order = {name: i for i, name in enumerate(ifnames)}
        return sorted(states, key=lambda s: (s.netns is not None, order.get(s.name, len(order))))
    finally:
        for ns in namespaces:
            ns.ipr.close()
            os.close(ns.fd)


def check_netdevs_idle(
    address: str, ifnames=(), *, force: bool = False, netns: str | None = None
) -> list[NetdevState]:
    """Refuse to take a device whose interfaces are in use: up with a routable address,
    or with other interfaces stacked on them, in any network namespace.

    `ifnames`: the names the device's sysfs `net/` lists, looked up in `netns` (a name in
    /run/netns; default this process's namespace); the device's interfaces in every
    namespace are found by their parent device (netdevs_everywhere). Returns the state of
    each interface found. Raises NetdevInUseError naming every interface in use, why and
    where, unless `force`.
    """
    states = netdevs_everywhere(address, list(ifnames), netns=netns)
    busy = [s for s in states if s.in_use]
    if busy and not force:
        detail = "; ".join(s.describe() for s in busy)
        raise NetdevInUseError(
            f"{address} is in use by the kernel: {detail}. Move the addresses away, take it "
            f"out of the bridge, bond or stacked devices and `ip link set {busy[0].name} "
            "down` first, or pass force=True to take it anyway"
        )
    return states


def set_netdevs_down(states) -> None:
    """Set interfaces (NetdevState, from check_netdevs_idle) administratively down, each in
    its network namespace, before their driver is unbound."""
    for state in states:
        with _netlink_in(state.netns or OWN_NETNS) as ipr:
            indexes = ipr.link_lookup(ifname=state.name)
            if indexes:
                ipr.link("set", index=indexes[0], state="down")
                log.info("set %s down", state.name)


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
        set_netdevs_down(check_netdevs_idle(address, info.netdevs, force=force, netns=netns))

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
