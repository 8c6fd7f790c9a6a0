"""ixyd.pci against a fake sysfs tree, and its netdev check against real interfaces in a netns.

The fake tree has the shape the kernel's has: device directories with vendor/device/class
attributes, `driver` and `iommu_group` symlinks, `net/<ifname>` entries, driver directories
with bind/unbind files and /sys/bus/pci/drivers_probe. `FakeKernel` plays the kernel's part
on writes (an unbind removes the driver link, drivers_probe binds by driver_override or by
ID) and records every write, so tests see exactly what ixyd would have written to /sys.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hosttools import FakeKernel, bind, make_device

import ixyd.pci
from ixyd.pci import (
    NetdevInUseError,
    PciBindError,
    PciDeviceInfo,
    bind_vfio,
    bind_vfio_group,
    check_netdevs_idle,
    group_blockers,
    parse_pci_address,
    release,
)

PORT0, PORT1, BRIDGE = "0000:03:00.0", "0000:03:00.1", "0000:00:01.0"


@pytest.fixture(autouse=True)
def forget_bindings():
    """ixyd.pci remembers original drivers per address; each test starts without any."""
    ixyd.pci._bindings.clear()
    yield
    ixyd.pci._bindings.clear()


@pytest.fixture
def sysfs(tmp_path):
    """Two 82599 ports on ixgbe sharing IOMMU group 14, a bridge on pcieport in group 14 too,
    vfio-pci loaded."""
    root = tmp_path / "sys"
    for driver in ("ixgbe", "vfio-pci", "pcieport"):
        d = root / "bus" / "pci" / "drivers" / driver
        d.mkdir(parents=True)
        (d / "bind").write_text("")
        (d / "unbind").write_text("")
    (root / "bus" / "pci" / "drivers" / "vfio-pci" / "new_id").write_text("")
    (root / "bus" / "pci" / "drivers_probe").write_text("")
    make_device(root, PORT0, group=14)
    make_device(root, PORT1, group=14)
    make_device(root, BRIDGE, group=14, device="0x1901", cls="0x060400")
    natural = {PORT0: "ixgbe", PORT1: "ixgbe", BRIDGE: "pcieport"}
    kernel = FakeKernel(str(root), natural)
    for address, driver in natural.items():
        bind(kernel, address, driver)
    return kernel


def single_group(kernel: FakeKernel) -> FakeKernel:
    """Move port 1 out of group 14, so port 0 shares it only with the bridge."""
    os.unlink(kernel.path("kernel", "iommu_groups", "14", "devices", PORT1))
    os.unlink(kernel.path("bus", "pci", "devices", PORT1, "iommu_group"))
    return kernel


# ------------------------------------------------------------------ addresses
@pytest.mark.parametrize(
    "text, canonical",
    [
        ("0000:03:00.0", "0000:03:00.0"),
        ("03:00.1", "0000:03:00.1"),
        ("0000:AF:1F.7", "0000:af:1f.7"),
    ],
)
def test_pci_address_is_canonicalised(text, canonical):
    assert parse_pci_address(text) == canonical


@pytest.mark.parametrize(
    "text",
    ["", "0000:03:00", "03:00", "0000:03:20.0", "0000:03:00.8", "zz:00.0", "0000:03:00.0 "]
    # `$` would let these through: it matches before a final newline
    + ["0000:03:00.0\n", "03:00.0\n"],
)
def test_malformed_pci_address_is_rejected_with_an_example(text):
    with pytest.raises(ValueError, match="dddd:bb:dd.f"):
        parse_pci_address(text)


# ------------------------------------------------------------------ facts
def test_device_info_reads_ids_group_driver_and_netdevs(sysfs):
    info = PciDeviceInfo.read("03:00.0", sysfs)
    assert info.address == PORT0
    assert (info.vendor_id, info.device_id, info.class_code) == (0x8086, 0x10FB, 0x020000)
    assert info.iommu_group == 14
    assert info.group_members == (BRIDGE, PORT0, PORT1)
    assert info.driver == "ixgbe"
    assert info.netdevs == ("ixfake0",)


def test_device_without_iommu_or_driver(sysfs):
    make_device(Path(sysfs.root), "0000:05:00.0", group=None)
    info = PciDeviceInfo.read("0000:05:00.0", sysfs)
    assert info.iommu_group is None and info.group_members == ()
    assert info.driver is None and info.netdevs == ()


def test_missing_device_is_reported_with_lspci_hint(sysfs):
    with pytest.raises(PciBindError, match=r"no PCI device 0000:09:00.0.*lspci"):
        PciDeviceInfo.read("0000:09:00.0", sysfs)


def test_group_blockers_ignore_bridges_and_vfio_devices(sysfs):
    assert group_blockers(14, sysfs) == [(PORT0, "ixgbe"), (PORT1, "ixgbe")]
    assert group_blockers(14, sysfs, exclude=(PORT0,)) == [(PORT1, "ixgbe")]


# ------------------------------------------------------------------ binding
def test_bind_uses_driver_override_and_drivers_probe_never_new_id(sysfs):
    single_group(sysfs)
    binding = bind_vfio(PORT0, sysfs=sysfs)
    dev = os.path.join("bus", "pci", "devices", PORT0)
    assert sysfs.writes == [
        (os.path.join(dev, "driver_override"), "vfio-pci"),
        (os.path.join(dev, "driver", "unbind"), PORT0),
        (os.path.join("bus", "pci", "drivers_probe"), PORT0),
    ]
    assert not any("new_id" in path for path, _ in sysfs.writes)
    assert sysfs.read("bus", "pci", "drivers", "vfio-pci", "new_id") == ""
    assert sysfs.driver(PORT0) == "vfio-pci"
    assert sysfs.driver(PORT1) == "ixgbe"  # the other port, same vendor:device, untouched
    assert (binding.original_driver, binding.netdevs, binding.iommu_group) == (
        "ixgbe",
        ("ixfake0",),
        14,
    )


def test_bind_is_idempotent(sysfs):
    single_group(sysfs)
    bind_vfio(PORT0, sysfs=sysfs)
    count = len(sysfs.writes)
    bind_vfio(PORT0, sysfs=sysfs)
    assert len(sysfs.writes) == count


def test_bind_refuses_without_vfio_pci_module_and_says_modprobe(sysfs):
    single_group(sysfs)
    os.rename(sysfs.path("bus", "pci", "drivers", "vfio-pci"), sysfs.path("vfio-pci.unloaded"))
    with pytest.raises(PciBindError, match="modprobe vfio-pci"):
        bind_vfio(PORT0, sysfs=sysfs)
    assert sysfs.writes == [] and sysfs.driver(PORT0) == "ixgbe"


def test_bind_refuses_without_iommu_group_and_says_intel_iommu_on(sysfs):
    make_device(Path(sysfs.root), "0000:05:00.0", group=None)
    with pytest.raises(PciBindError, match=r"no IOMMU group.*intel_iommu=on"):
        bind_vfio("0000:05:00.0", sysfs=sysfs)
    assert sysfs.writes == []


def test_bind_refuses_a_device_whose_group_sibling_is_on_a_kernel_driver(sysfs):
    with pytest.raises(PciBindError) as caught:
        bind_vfio(PORT0, sysfs=sysfs)
    message = str(caught.value)
    assert "IOMMU group 14" in message and f"{PORT1} (bound to ixgbe)" in message
    assert "bind_vfio_group" in message
    assert BRIDGE not in message  # pcieport does not block a group
    assert sysfs.writes == [] and sysfs.driver(PORT0) == "ixgbe"


def test_bind_refuses_a_device_already_on_vfio_while_its_group_sibling_is_not(sysfs):
    os.unlink(sysfs.path("bus", "pci", "devices", PORT0, "driver"))
    bind(sysfs, PORT0, "vfio-pci")  # someone bound one function by hand
    writes = list(sysfs.writes)
    with pytest.raises(PciBindError, match=rf"IOMMU group 14 with {PORT1} \(bound to ixgbe\)"):
        bind_vfio(PORT0, sysfs=sysfs)
    assert sysfs.writes == writes


def test_bind_group_binds_every_blocking_member_and_leaves_the_bridge(sysfs):
    bindings = bind_vfio_group(PORT0, sysfs=sysfs)
    assert [b.address for b in bindings] == [PORT0, PORT1]
    assert sysfs.driver(PORT0) == sysfs.driver(PORT1) == "vfio-pci"
    assert sysfs.driver(BRIDGE) == "pcieport"
    assert group_blockers(14, sysfs) == []


def test_bind_reports_a_probe_that_did_not_take(sysfs):
    single_group(sysfs)
    sysfs.refuse.add("vfio-pci")
    with pytest.raises(PciBindError, match=r"did not bind to vfio-pci.*dmesg.*release"):
        bind_vfio(PORT0, sysfs=sysfs, timeout=0.05)


def test_release_gives_the_device_back_to_its_driver_and_its_netdev_returns(sysfs):
    single_group(sysfs)
    bind_vfio(PORT0, sysfs=sysfs)
    assert sysfs.netdevs(PORT0) == []
    del sysfs.writes[:]
    names = release(PORT0, sysfs=sysfs)
    dev = os.path.join("bus", "pci", "devices", PORT0)
    assert sysfs.writes == [
        (os.path.join(dev, "driver", "unbind"), PORT0),
        (os.path.join(dev, "driver_override"), "\n"),
        (os.path.join("bus", "pci", "drivers_probe"), PORT0),
    ]
    # The unbind went to vfio-pci's unbind file, through the driver link.
    assert sysfs.read("bus", "pci", "drivers", "vfio-pci", "unbind") == PORT0
    assert sysfs.driver(PORT0) == "ixgbe"
    assert names == ["ixfake0"]


def test_release_of_a_device_that_never_had_a_driver(sysfs):
    make_device(Path(sysfs.root), "0000:06:00.0", group=20)
    bind_vfio("0000:06:00.0", sysfs=sysfs)
    assert release("0000:06:00.0", sysfs=sysfs, timeout=0.05) == []
    assert sysfs.driver("0000:06:00.0") is None


# ------------------------------------------------------------------ interfaces (real netlink)
def _can_use_netns() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"ixyd-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


needs_netns = pytest.mark.skipif(not _can_use_netns(), reason="needs root and `ip netns`")


@pytest.fixture
def veth_netns():
    """A fresh network namespace holding a veth pair ixytest0/ixytest1, both down."""
    from pyroute2 import NetNS, netns

    name = f"ixyd-test-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="ixytest0", kind="veth", peer="ixytest1")
        yield name
    finally:
        netns.remove(name)


def _ns_set(name, ifname, *, up=None, address=None, family=None):
    from pyroute2 import NetNS

    with NetNS(name) as ns:
        index = ns.link_lookup(ifname=ifname)[0]
        if address:
            addr, prefix = address.split("/")
            ns.addr("add", index=index, address=addr, prefixlen=int(prefix))
        if up is not None:
            ns.link("set", index=index, state="up" if up else "down")


def _ns_is_up(name, ifname) -> bool:
    from pyroute2 import NetNS

    with NetNS(name) as ns:
        return bool(ns.get_links(ns.link_lookup(ifname=ifname)[0])[0]["flags"] & 1)


@needs_netns
def test_interface_up_with_an_address_is_refused_by_name(veth_netns):
    _ns_set(veth_netns, "ixytest0", address="192.0.2.1/24", up=True)
    _ns_set(veth_netns, "ixytest0", address="2001:db8::1/64")
    with pytest.raises(NetdevInUseError) as caught:
        check_netdevs_idle(PORT0, ["ixytest0", "ixytest1"], netns=veth_netns)
    message = str(caught.value)
    assert message.startswith(f"{PORT0} is in use")
    assert "ixytest0 is up with 192.0.2.1/24, 2001:db8::1/64" in message
    assert "ixytest1" not in message  # down, no address
    assert "force=True" in message


@needs_netns
def test_force_takes_a_busy_interface_and_reports_its_state(veth_netns):
    _ns_set(veth_netns, "ixytest0", address="192.0.2.1/24", up=True)
    states = check_netdevs_idle(PORT0, ["ixytest0"], force=True, netns=veth_netns)
    assert [(s.name, s.up, s.addresses, s.in_use) for s in states] == [
        ("ixytest0", True, ("192.0.2.1/24",), True)
    ]


@needs_netns
def test_link_local_addresses_and_down_interfaces_do_not_count_as_in_use(veth_netns):
    _ns_set(veth_netns, "ixytest0", address="169.254.7.7/16", up=True)
    _ns_set(veth_netns, "ixytest0", address="fe80::7/64")
    _ns_set(veth_netns, "ixytest1", address="198.51.100.1/24")  # configured but down
    states = check_netdevs_idle(PORT0, ["ixytest0", "ixytest1", "nonexistent9"], netns=veth_netns)
    assert [(s.name, s.up, s.addresses) for s in states] == [
        ("ixytest0", True, ()),
        ("ixytest1", False, ("198.51.100.1/24",)),
    ]


@needs_netns
def test_bind_refuses_a_nic_whose_interface_is_in_use_then_takes_it_down(sysfs, veth_netns):
    """The whole bind path: the fake device's netdev is a real veth in a real netns."""
    single_group(sysfs)
    os.rmdir(sysfs.path("bus", "pci", "devices", PORT0, "net", "ixfake0"))
    os.makedirs(sysfs.path("bus", "pci", "devices", PORT0, "net", "ixytest0"))
    _ns_set(veth_netns, "ixytest0", address="192.0.2.1/24", up=True)
    with pytest.raises(NetdevInUseError, match=r"ixytest0 is up with 192\.0\.2\.1/24"):
        bind_vfio(PORT0, sysfs=sysfs, netns=veth_netns)
    assert sysfs.writes == [] and sysfs.driver(PORT0) == "ixgbe"

    from pyroute2 import NetNS

    with NetNS(veth_netns) as ns:
        index = ns.link_lookup(ifname="ixytest0")[0]
        ns.addr("del", index=index, address="192.0.2.1", prefixlen=24)
    assert _ns_is_up(veth_netns, "ixytest0")
    binding = bind_vfio(PORT0, sysfs=sysfs, netns=veth_netns)
    assert binding.netdevs == ("ixytest0",)
    assert not _ns_is_up(veth_netns, "ixytest0")  # set down before the unbind
    assert sysfs.driver(PORT0) == "vfio-pci"


# ------------------------------------------------------------------ stacked and moved interfaces
# Real interfaces in namespaces of this test's own. The kernel here has
# veth, bridge and macvlan; VLAN and bond lowers, and a NIC's own interface moved into
# another namespace, are shown with igb in the guest (tests/vm/test_netdev_in_use_guest.py).
def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


@pytest.fixture
def host_netns():
    """A factory of fresh network namespaces (ixt-host-<random>), removed afterwards; the
    first one made holds a veth pair ixh0/ixh1, both up, no addresses."""
    made = []

    def make() -> str:
        name = f"ixt-host-{uuid.uuid4().hex[:8]}"
        _ip("netns", "add", name)
        made.append(name)
        if len(made) == 1:
            _ip("-n", name, "link", "add", "ixh0", "type", "veth", "peer", "name", "ixh1")
            for ifname in ("ixh0", "ixh1"):
                _ip("-n", name, "link", "set", ifname, "up")
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@needs_netns
def test_a_bridge_port_is_in_use_though_the_address_is_on_the_bridge(host_netns):
    """The uplink of a bridge carries the host's traffic while the address sits on br0: the
    uplink itself has none, up and idle by the address rule alone."""
    ns = host_netns()
    _ip("-n", ns, "link", "add", "ixhbr0", "type", "bridge")
    _ip("-n", ns, "link", "set", "ixh0", "master", "ixhbr0")
    _ip("-n", ns, "addr", "add", "192.0.2.1/24", "dev", "ixhbr0")
    _ip("-n", ns, "link", "set", "ixhbr0", "up")
    with pytest.raises(NetdevInUseError, match="ixh0 is a port of bridge ixhbr0") as caught:
        check_netdevs_idle(PORT0, ["ixh0"], netns=ns)
    assert "ixh1" not in str(caught.value)  # its veth peer is not stacked on it
    [state] = check_netdevs_idle(PORT0, ["ixh0"], netns=ns, force=True)
    assert state.up and state.addresses == () and state.in_use


@needs_netns
def test_a_macvlan_lower_is_in_use_in_its_namespace_and_from_another(host_netns):
    """A macvlan on the NIC counts whether it stays beside it or was moved into a
    container's namespace (IFLA_LINK_NETNSID names the lower's namespace there)."""
    ns = host_netns()
    _ip("-n", ns, "link", "add", "link", "ixh0", "name", "ixhmv0", "type", "macvlan")
    with pytest.raises(NetdevInUseError, match="ixh0 is a lower of macvlan ixhmv0"):
        check_netdevs_idle(PORT0, ["ixh0"], netns=ns)

    container = host_netns()
    _ip("-n", ns, "link", "set", "ixhmv0", "netns", container)
    expected = f"ixh0 is a lower of macvlan ixhmv0 in network namespace /run/netns/{container}"
    with pytest.raises(NetdevInUseError, match=re.escape(expected)):
        check_netdevs_idle(PORT0, ["ixh0"], netns=ns)
    _ip("-n", container, "link", "del", "ixhmv0")
    assert [s.in_use for s in check_netdevs_idle(PORT0, ["ixh0"], netns=ns)] == [False]


@needs_netns
def test_every_network_namespace_is_found_named_held_by_a_process_or_mounted(host_netns, tmp_path):
    """Where a NIC's interface may have gone: a namespace named by `ip netns add`, one only
    a process is in (a container without a name), one bind-mounted somewhere else."""
    named = host_netns()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        ns_link = f"/proc/{holder.pid}/ns/net"
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 30
        while os.stat(ns_link).st_ino == own:  # unshare has not unshared yet
            assert time.monotonic() < deadline, "unshare --net did not make a namespace"
            time.sleep(0.01)
        mounted = tmp_path / "ixt-host-mounted"
        mounted.touch()
        subprocess.run(["unshare", "--net", "--", "true"], check=True)  # (not kept: gone)
        spare = subprocess.Popen(["unshare", "--net", "sleep", "300"])
        try:
            spare_link = f"/proc/{spare.pid}/ns/net"
            while os.stat(spare_link).st_ino == own:
                assert time.monotonic() < deadline, "unshare --net did not make a namespace"
                time.sleep(0.01)
            subprocess.run(["mount", "--bind", spare_link, str(mounted)], check=True)
        finally:
            spare.kill()
            spare.wait()
        try:
            found = ixyd.pci.network_namespaces()
            inodes = {os.stat(p).st_ino: p for p in found}
            assert found[0] == "/proc/self/ns/net"
            assert os.stat(f"/run/netns/{named}").st_ino in inodes
            assert inodes[os.stat(ns_link).st_ino] == ns_link  # only a process is in it
            assert inodes[os.stat(mounted).st_ino] == str(mounted)  # no process: the mount
            assert len(inodes) == len(found)  # one path per namespace
        finally:
            subprocess.run(["umount", str(mounted)], check=True)
    finally:
        holder.kill()
        holder.wait()
