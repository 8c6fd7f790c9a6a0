"""Guest scenario: an igb port whose interface is in use is not taken.

Runs as root in the test guest with the kernel's igb driver bound to both ports
(tests/vm/harness.py, with_igb_driver=True). One port (FIRST_MAC) is set up in ways that
each make it in use without an address of its own in this namespace, and each time
ixyd.pci.check_netdevs_idle must refuse it, naming why:

 1. idle: its interface down, no address: accepted (the control case);
 2. the lower device of a VLAN (8021q), 3. a bond slave, 4. a bridge port with the
    address on the bridge, 5. the lower device of a macvlan moved into another namespace;
 6. the interface itself moved into a named namespace (`ip netns add`), up with an
    address there: the device's sysfs net/ is empty in this namespace, yet it is found (by
    its PCI parent device) and refused, and `ixyd-host prepare` exits 1 leaving it on igb
    and keeping no IOMMU-group record;
 7. the same in a namespace only a process is in (no name, no mount);
 8. with the address gone it is taken: bind_vfio sets it down in its namespace, binds
    vfio-pci, and release gives it back to igb (its interface reappears here).

The stacking modules are loaded from the guest kernel's tree ($IXT_KROOT): the guest's
root is the host's, whose /lib/modules is not the guest kernel's.

Prints one line `NETDEV_IN_USE_RESULT <json>`; exits 0 when every check passed, 1 when a
check failed, 2 on an unexpected exception.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest_pci  # noqa: E402  (after the path setup above)
from guest_checks import Report, netdevs, wait_for  # noqa: E402

from ixyd import host, pci  # noqa: E402

MARKER = "NETDEV_IN_USE_RESULT"
FIRST_MAC = "52:54:00:00:00:01"
NETNS = "ixt-host-guest"  # a named namespace, as `ip netns add` makes them
STACKING_MODULES = ("8021q", "bonding", "bridge", "macvlan")
MODPROBE_D = "/run/ixyd-empty-modprobe.d"  # guest_init.sh: ignore the host's modprobe.d

report = Report()
summary, failures, check = report.summary, report.failures, report.check


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def refusal(bdf: str, ifnames) -> str | None:
    """check_netdevs_idle's refusal message, None when it accepts the device."""
    try:
        pci.check_netdevs_idle(bdf, ifnames)
    except pci.NetdevInUseError as exc:
        return str(exc)
    return None


def refused_for(name: str, bdf: str, ifnames, *words: str) -> None:
    message = refusal(bdf, ifnames)
    check(name, message is not None and all(w in message for w in words), message)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    kroot = os.environ["IXT_KROOT"]
    sh("modprobe", "-C", MODPROBE_D, "-d", kroot, "-a", *STACKING_MODULES)

    ports = guest_pci.igb_addresses_in_guest()  # MAC -> BDF
    bdf = ports[FIRST_MAC]
    check("on_igb", guest_pci.bound_driver(bdf) == "igb", guest_pci.bound_driver(bdf))
    [ifname] = netdevs(bdf)
    summary["port"], summary["ifname"] = bdf, ifname
    sh("ip", "link", "set", ifname, "down")

    # 1. idle
    check("idle_accepted", refusal(bdf, [ifname]) is None, refusal(bdf, [ifname]))

    # 2. VLAN
    sh("ip", "link", "add", "link", ifname, "name", "ixh.5", "type", "vlan", "id", "5")
    refused_for("vlan_lower_refused", bdf, [ifname], f"{ifname} is a lower of vlan ixh.5")
    sh("ip", "link", "del", "ixh.5")

    # 3. bond
    sh("ip", "link", "add", "ixhbond0", "type", "bond")
    sh("ip", "link", "set", ifname, "master", "ixhbond0")
    refused_for("bond_slave_refused", bdf, [ifname], f"{ifname} is a port of bond ixhbond0")
    sh("ip", "link", "set", ifname, "nomaster")
    sh("ip", "link", "del", "ixhbond0")

    # 4. bridge, the address on the bridge
    sh("ip", "link", "add", "ixhbr0", "type", "bridge")
    sh("ip", "link", "set", ifname, "master", "ixhbr0")
    sh("ip", "addr", "add", "192.0.2.1/24", "dev", "ixhbr0")
    sh("ip", "link", "set", "ixhbr0", "up")
    sh("ip", "link", "set", ifname, "up")
    refused_for("bridge_port_refused", bdf, [ifname], f"{ifname} is a port of bridge ixhbr0")
    sh("ip", "link", "del", "ixhbr0")
    sh("ip", "link", "set", ifname, "down")

    # 5. a macvlan on it, in a container's namespace
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", "link", ifname, "name", "ixhmv0", "type", "macvlan")
    sh("ip", "link", "set", "ixhmv0", "netns", NETNS)
    refused_for(
        "macvlan_in_other_namespace_refused",
        bdf,
        [ifname],
        f"{ifname} is a lower of macvlan ixhmv0 in network namespace /run/netns/{NETNS}",
    )
    sh("ip", "-n", NETNS, "link", "del", "ixhmv0")
    check("idle_again", refusal(bdf, [ifname]) is None, refusal(bdf, [ifname]))

    # 6. the interface itself in a named namespace, up with an address there
    sh("ip", "link", "set", ifname, "netns", NETNS)
    sh("ip", "-n", NETNS, "addr", "add", "198.51.100.1/24", "dev", ifname)
    sh("ip", "-n", NETNS, "link", "set", ifname, "up")
    check("gone_from_sysfs_net", netdevs(bdf) == [], netdevs(bdf))
    refused_for(
        "moved_interface_refused",
        bdf,
        netdevs(bdf),
        f"{ifname} is up with 198.51.100.1/24 (in network namespace /run/netns/{NETNS})",
    )
    # root's ExecStartPre=+ (in this process: a second Python would import pyroute2 over
    # 9p again, tens of seconds under TCG)
    said = LogLines()
    logging.getLogger("ixyd.host").addHandler(said)
    status = host.main(["prepare", "--group", "root", "--", bdf])
    logging.getLogger("ixyd.host").removeHandler(said)
    check(
        "prepare_exits_1_and_leaves_it_on_igb",
        status == 1
        and any(f"{ifname} is up with 198.51.100.1/24" in line for line in said.lines)
        and guest_pci.bound_driver(bdf) == "igb"
        and not Path(host.MARK_DIR, str(guest_pci.iommu_group(bdf))).exists(),
        {"status": status, "said": said.lines},
    )
    sh("ip", "-n", NETNS, "link", "set", ifname, "netns", "1")  # back home
    wait_for(lambda: netdevs(bdf) == [ifname], 5)

    # 7. in a namespace only a process is in
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        wait_for(lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own, 10)
        sh("ip", "link", "set", ifname, "netns", str(holder.pid))
        enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
        sh(*enter, "ip", "addr", "add", "198.51.100.2/24", "dev", ifname)
        sh(*enter, "ip", "link", "set", ifname, "up")
        refused_for(
            "interface_in_unnamed_namespace_refused",
            bdf,
            netdevs(bdf),
            f"{ifname} is up with 198.51.100.2/24 (in network namespace /proc/{holder.pid}/",
        )
        sh(*enter, "ip", "addr", "del", "198.51.100.2/24", "dev", ifname)

        # 8. idle where it is: taken, set down there, and given back
        binding = pci.bind_vfio(bdf)
        check(
            "idle_moved_interface_taken",
            guest_pci.bound_driver(bdf) == "vfio-pci" and binding.original_driver == "igb",
            {"driver": guest_pci.bound_driver(bdf), "binding": str(binding)},
        )
        back = pci.release(bdf)
        check(
            "released_to_igb",
            guest_pci.bound_driver(bdf) == "igb" and back == netdevs(bdf) and len(back) == 1,
            {"driver": guest_pci.bound_driver(bdf), "netdevs": back},
        )
    finally:
        holder.kill()
        holder.wait()
    return 1 if failures else 0


if __name__ == "__main__":
    started = time.monotonic()
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        summary["error"] = traceback.format_exc(limit=3)
        code = 2
    summary["failures"] = failures
    summary["seconds"] = round(time.monotonic() - started, 2)
    print(f"{MARKER} {json.dumps(summary)}", flush=True)
    sys.exit(code)
