"""ixyd under real systemd on real VFIO: `systemctl start ixyd@<address>`
binds the guest's two igb ports to vfio-pci, runs the daemon as user ixyd, forwards frames
between the ports, serves control and metrics; `systemctl stop` gives the ports back to igb.

Runs inside the test guest booted with systemd as PID 1 (harness.py run_in_guest(
init="systemd", with_igb_driver=True)), as root. Steps:

 1. MAC -> PCI address of both igb functions (while igb has them, with their netdevs).
 2. Install ixyd the way a host would have it: a venv of a system Python outside /home and
    /root (ixyd@.service has ProtectHome=yes, and user ixyd cannot enter /root anyway), then
    `ixyd-host install --bin-dir` it: accounts (sysusers), directories (tmpfiles), the udev
    rule, the units, daemon-reload. An operator account in group ixyd-ops for ixyd-ctl.
 3. /etc/ixyd/<address A>.toml: both ports in one instance, A generates GENERATE_COUNT
    frames, B reflects them back over the wire (the QEMU hub between the two ports). The
    vfio modules are unloaded, as on a host where nothing has used VFIO since boot.
 4. `systemctl start ixyd@<address A>` (Type=notify: returns when the daemon is ready).
 5. Checks: unit active; its main process runs as ixyd (uid and gid not 0); both functions
    on vfio-pci with /dev/vfio/<group> for group ixyd; the socket-activated control socket
    root:ixyd-ops 0660 answers `ixyd-ctl status/stats` for root and for the operator, a
    change from the operator is refused, a user outside ixyd-ops cannot connect; counters
    advance (A sent and got frames back, B got them and sent them back); the metrics
    endpoint serves ixyd_ series with packet counters > 0.
 6. `systemctl stop`: unit inactive with result success, both functions back on igb with
    their netdevs, /dev/vfio/<group> gone, socket and group records removed, no process of
    user ixyd left, no DMAR fault.

Prints a JSON summary as its last line; exit status 0 when every check passed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import shutil
import socket as socketlib
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest_pci  # noqa: E402
from guest_checks import (  # noqa: E402
    CheckFailed,
    check,
    dmar_faults,
    netdevs,
    run_and_report,
    step,
    wait_for,
)

from ixyd.host import HIDDEN_FROM_DAEMON, why_daemon_cannot_reach  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
MAC_A, MAC_B = "52:54:00:00:00:01", "52:54:00:00:00:02"
PREFIX = Path("/opt/ixyd")  # the guest's installation of ixyd (a venv)
DAEMON_USER = "ixyd"
OPS_GROUP = "ixyd-ops"
OPERATOR = "ixyd-op"  # a member of OPS_GROUP: may read, not change
OUTSIDER = "ixyd-outsider"  # in neither group: may not even connect
RUN_DIR = Path("/run/ixyd")
METRICS = "127.0.0.1:19911"
GENERATE_COUNT = 500
GENERATE_RATE = 1000
START_TIMEOUT = 120.0  # s for `systemctl start` (the unit allows 60 s, plus TCG slack)
STOP_TIMEOUT = 60.0
COUNTER_TIMEOUT = 20.0
CTL_TIMEOUT = "30"  # ixyd-ctl --timeout: a Python start over 9p takes seconds under TCG


def run(*argv: str, timeout: float = 60, user: str | None = None, ok: bool = True):
    """Runs a command (as `user`, with its groups, when given); CheckFailed on a non-zero
    exit when `ok`."""
    if user is not None:
        argv = ("setpriv", "--reuid", user, "--regid", user, "--init-groups", "--", *argv)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if ok:
        check(
            done.returncode == 0,
            f"`{' '.join(argv)}`: exit {done.returncode}: {(done.stderr or done.stdout).strip()}",
        )
    return done


# ------------------------------------------------------------------------ installation
def system_python() -> Path:
    """A Python of this venv's version that the unit's sandbox and user ixyd can run: the
    venv's own base interpreter if it qualifies (not under /root, e.g. pyenv), else the
    distribution's python3.X."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys._base_executable), Path(f"/usr/bin/python{version}")]
    for candidate in candidates:
        if candidate.exists() and why_daemon_cannot_reach(str(candidate), execute=True) is None:
            return candidate.resolve()
    raise CheckFailed(
        f"no Python {version} that user {DAEMON_USER} may run outside "
        f"{', '.join(HIDDEN_FROM_DAEMON)} "
        f"(tried {', '.join(map(str, candidates))}); install python{version}"
    )


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """ixyd's installed dependencies, transitively, for this platform and without extras
    (not ixyd itself: it is copied from the tree)."""
    from packaging.requirements import Requirement  # pytest's dependency: in the test venv

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = ["ixyd"]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # another platform's, or an extra's (test)
            key = requirement.name.lower().replace("-", "_")
            if key not in seen:
                seen[key] = importlib.metadata.distribution(requirement.name)
                todo.append(requirement.name)
    return list(seen.values())


def bind(source: Path, target: Path) -> None:
    """Bind-mounts `source` (a directory or a file) on `target`: the installation shows the
    tree's files without copying them (which takes seconds over 9p under TCG) and without
    the path to them, which may lead through /root or /home."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    run("mount", "--bind", str(source), str(target))


def install_prefix(summary: dict) -> Path:
    """PREFIX as a venv of a system Python holding ixyd (its package from the tree, with the
    compiled modules; its units and configuration under share/ixyd, where the wheel's
    data-files put them) and its dependencies, each bound from the test venv;
    bin/ has the entry points of pyproject.toml. Returns PREFIX/bin."""
    python = system_python()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = PREFIX / "lib" / f"python{version}" / "site-packages"
    bin_dir = PREFIX / "bin"
    site.mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python)
    (bin_dir / "python").symlink_to("python3")
    (PREFIX / "pyvenv.cfg").write_text(
        f"home = {python.parent}\ninclude-system-site-packages = false\n"
        f"version = {version}.{sys.version_info.micro}\n"
    )
    bind(REPO_ROOT / "ixyd", site / "ixyd")
    copied = []
    for dist in runtime_distributions():
        tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
        for top in sorted(tops):
            source = Path(dist.locate_file(top))
            if source.exists() and not source.name.endswith(".pth"):
                bind(source, site / top)
        copied.append(f"{dist.metadata['Name']} {dist.version}")
    from ixyd import host  # the files `ixyd-host install` looks for

    share = PREFIX / "share" / "ixyd"
    for name in (*host.UNIT_FILES, *(source for source, _ in host.CONFIG_FILES)):
        (share / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, share / name)
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        script = bin_dir / name
        script.write_text(
            f"#!{bin_dir / 'python3'}\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n"
        )
        script.chmod(0o755)
    summary["install"] = {"python": str(python), "prefix": str(PREFIX), "dependencies": copied}
    return bin_dir


# ------------------------------------------------------------------------ the instance
def config_text(bdf_a: str, bdf_b: str) -> str:
    port = """
[[port]]
address = "{address}"
rx_queues = 1
rx_ring = 256
tx_ring = 256
pool_size = 512
link_timeout = 10.0
cpus = [1]
forward = {forward}
"""
    generate = f'{{mode = "generate", size = 60, rate = {GENERATE_RATE}, count = {GENERATE_COUNT}}}'
    return (
        f'# written by tests/vm/scenarios/systemd_vfio.py\nmetrics = "{METRICS}"\n'
        f"give_back = true\n"
        + port.format(address=bdf_a, forward=generate)
        + port.format(address=bdf_b, forward='{mode = "reflect"}')
    )


def unit_properties(unit: str, *names: str) -> dict[str, str]:
    done = run("systemctl", "show", unit, "-p", ",".join(names))
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def process_ids(pid: int) -> dict[str, list[int]]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                fields[key] = [int(v) for v in value.split()]
    return fields


def processes_of(uid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(f"{entry.name} {(entry / 'comm').read_text().strip()}")
            except OSError:
                continue  # exited meanwhile
    return found


def rpc(instance: str, method: str, **params) -> dict:
    """One JSON-RPC call straight on the socket, as root: for polling, where starting
    ixyd-ctl (a Python process over 9p, seconds under TCG) each time would be too slow."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
        s.settimeout(20.0)
        s.connect(str(RUN_DIR / f"{instance}.sock"))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            check(chunk != b"", f"{method}: connection closed")
            data += chunk
    reply = json.loads(data)
    check("result" in reply, f"{method}: {reply.get('error')}")
    return reply["result"]


def counters(instance: str) -> dict[str, dict]:
    return {p["name"]: p["counters"] for p in rpc(instance, "stats")["ports"]}


def scrape() -> dict[str, float]:
    """The metrics endpoint's samples, `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=20) as reply:
        check(reply.status == 200, f"metrics: HTTP {reply.status}")
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, device: str) -> float | None:
    """The value of series `name` with device=`device` (summed over its queues)."""
    values = [
        v for k, v in samples.items() if k.startswith(name + "{") and f'device="{device}"' in k
    ]
    return sum(values) if values else None


def node_owner(group: str) -> list:
    st = os.stat(f"/dev/vfio/{group}")
    return [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]


def wait_for_path(path: Path, present: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() != present:
        check(time.monotonic() < deadline, f"{path} {'absent' if present else 'present'}")
        time.sleep(0.05)


def rebind(bdf: str, group: str) -> list:
    """Unbind the device from vfio-pci and probe it again (driver_override keeps it on
    vfio-pci), as a hot reset, a re-plug or an admin would: the kernel removes the group's
    node and creates it anew, root 0600, and udev handles the add. Returns the node's
    owner, group and mode once udev is done."""
    node = Path("/dev/vfio", group)
    Path("/sys/bus/pci/drivers/vfio-pci/unbind").write_text(bdf)
    wait_for_path(node, present=False)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    wait_for_path(node, present=True)
    run("udevadm", "settle", "--timeout=20", timeout=30)
    return node_owner(group)


def udev_rule_gives_new_nodes_to_ixyd(
    summary: dict, bin_dir: Path, instance: str, bdf: str, group: str, daemon_gid: int
) -> None:
    """etc/udev/rules.d/70-ixyd-vfio.rules: a node the kernel creates anew for a group that
    ixyd-host marked (the device went through vfio-pci again without `prepare`) gets group
    ixyd 0660 from udev; without the mark the rule does not match and the node stays the
    kernel's root 0600, so it is the rule that does it. Done by hand before the unit runs
    (prepare, the rebinds, release), since vfio-pci cannot let go of a device in use."""
    check(Path("/run/udev/control").exists(), "systemd-udevd is not running in the guest")
    host = str(bin_dir / "ixyd-host")
    run(host, "prepare", "--group", DAEMON_USER, instance, timeout=60)
    mark = Path("/run/ixyd/vfio", group)
    aside = mark.with_name(f".{group}.aside")
    seen = {"prepared": node_owner(group), "marked": rebind(bdf, group)}
    mark.rename(aside)
    try:
        seen["unmarked"] = rebind(bdf, group)
    finally:
        aside.rename(mark)
    seen["marked_again"] = rebind(bdf, group)
    run(host, "release", instance, timeout=60)
    seen["released_to"] = guest_pci.bound_driver(bdf)
    summary["udev_new_nodes"] = seen
    ours, kernels = [0, daemon_gid, "0o660"], [0, 0, "0o600"]
    check(
        seen
        == {
            "prepared": ours,
            "marked": ours,
            "unmarked": kernels,
            "marked_again": ours,
            "released_to": "igb",
        },
        f"/dev/vfio/{group} after rebinds: {seen}",
    )


# ------------------------------------------------------------------------ the scenario
def scenario(summary: dict, timings: dict) -> None:
    addresses = guest_pci.igb_addresses_in_guest()
    check({MAC_A, MAC_B} <= set(addresses), f"igb ports found: {addresses}")
    bdf_a, bdf_b = addresses[MAC_A], addresses[MAC_B]
    instance, unit = bdf_a, f"ixyd@{bdf_a}.service"
    summary.update(ports_by_mac={MAC_A: bdf_a, MAC_B: bdf_b}, unit=unit)
    summary["before"] = {
        bdf: {"driver": guest_pci.bound_driver(bdf), "netdevs": netdevs(bdf)}
        for bdf in (bdf_a, bdf_b)
    }
    check(
        all(v["driver"] == "igb" and v["netdevs"] for v in summary["before"].values()),
        f"igb does not hold both ports at the start: {summary['before']}",
    )
    groups = {bdf: guest_pci.iommu_group(bdf) for bdf in (bdf_a, bdf_b)}

    t0 = time.monotonic()
    step(f"installing ixyd into {PREFIX}")
    bin_dir = install_prefix(summary)
    done = run(str(bin_dir / "ixyd-host"), "install", "--bin-dir", str(bin_dir), timeout=120)
    summary["host_install"] = done.stdout.splitlines()
    check(
        any("daemon-reload" in line for line in summary["host_install"]),
        f"ixyd-host install did not reload systemd: {done.stdout}",
    )
    daemon = pwd.getpwnam(DAEMON_USER)
    account = ("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin")
    run(*account, "--groups", OPS_GROUP, OPERATOR)
    run(*account, OUTSIDER)
    summary["accounts"] = {
        "daemon": [daemon.pw_uid, daemon.pw_gid],
        "operator_groups": run("id", "-nG", OPERATOR).stdout.split(),
    }
    check(daemon.pw_uid != 0 and daemon.pw_gid != 0, f"user {DAEMON_USER}: {daemon}")
    state_dir = os.stat("/var/lib/ixyd")
    summary["state_dir"] = [state_dir.st_uid, stat.S_IMODE(state_dir.st_mode)]
    exec_start = unit_properties(unit, "ExecStart")["ExecStart"]
    check(f"path={bin_dir}/ixyd " in exec_start, f"ExecStart: {exec_start}")
    timings["install_s"] = round(time.monotonic() - t0, 2)

    Path("/etc/ixyd", f"{instance}.toml").write_text(config_text(bdf_a, bdf_b))
    step("udev rule: a new node of a marked group goes to group ixyd")
    udev_rule_gives_new_nodes_to_ixyd(
        summary, bin_dir, instance, bdf_a, str(groups[bdf_a]), daemon.pw_gid
    )
    # As on a host that has not used VFIO since boot: the unit must load vfio-pci before its
    # device policy is set up (DeviceAllow=char-vfio is resolved from /proc/devices then).
    run("modprobe", "-r", "vfio_pci", "vfio_iommu_type1", "vfio")
    summary["vfio_loaded_before_start"] = Path("/sys/module/vfio").exists()
    step(f"systemctl start {unit}")
    t0 = time.monotonic()
    started = run("systemctl", "start", unit, timeout=START_TIMEOUT, ok=False)
    timings["start_s"] = round(time.monotonic() - t0, 2)
    if started.returncode != 0:
        status = run("systemctl", "status", "--no-pager", "-l", unit, ok=False)
        raise CheckFailed(
            f"systemctl start {unit}: exit {started.returncode}: {started.stderr.strip()}\n"
            f"{status.stdout}"
        )
    try:
        running(summary, timings, instance, unit, bdf_a, bdf_b, groups)
    finally:
        step(f"systemctl stop {unit}")
        t0 = time.monotonic()
        stopped = run("systemctl", "stop", unit, timeout=STOP_TIMEOUT, ok=False)
        timings["stop_s"] = round(time.monotonic() - t0, 2)
    check(stopped.returncode == 0, f"systemctl stop: {stopped.stderr.strip()}")
    after_stop(summary, instance, unit, bdf_a, bdf_b, groups, daemon.pw_uid)


def running(
    summary: dict, timings: dict, instance: str, unit: str, bdf_a: str, bdf_b: str, groups: dict
) -> None:
    props = unit_properties(
        unit, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "Result"
    )
    summary["running"] = props
    check(props["ActiveState"] == "active" and props["SubState"] == "running", f"{props}")
    ids = process_ids(int(props["MainPID"]))
    summary["main_process"] = ids
    daemon = pwd.getpwnam(DAEMON_USER)
    check(
        ids["Uid"] == [daemon.pw_uid] * 4 and ids["Gid"] == [daemon.pw_gid] * 4,
        f"main process ids {ids}, expected user {DAEMON_USER} {daemon.pw_uid}:{daemon.pw_gid}",
    )
    check(0 not in ids["Uid"] + ids["Gid"] + ids["Groups"], f"main process ids {ids}")

    summary["bound"] = {bdf: guest_pci.bound_driver(bdf) for bdf in (bdf_a, bdf_b)}
    check(set(summary["bound"].values()) == {"vfio-pci"}, f"drivers: {summary['bound']}")
    nodes = {}
    for bdf, group in groups.items():
        st = os.stat(f"/dev/vfio/{group}")
        nodes[bdf] = [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]
    summary["vfio_nodes"] = nodes
    check(all(n == [0, daemon.pw_gid, "0o660"] for n in nodes.values()), f"/dev/vfio: {nodes}")

    sock = RUN_DIR / f"{instance}.sock"
    st = os.stat(sock)
    summary["control_socket"] = {
        "uid": st.st_uid,
        "group": Path(sock).group(),
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "unit": unit_properties(f"ixyd@{instance}.socket", "ActiveState")["ActiveState"],
    }
    check(
        summary["control_socket"] == {"uid": 0, "group": OPS_GROUP, "mode": "0o660",
                                      "unit": "active"},
        f"control socket: {summary['control_socket']}",
    )  # fmt: skip

    ctl = [str(PREFIX / "bin" / "ixyd-ctl"), "-i", instance, "--json", "--timeout", CTL_TIMEOUT]
    t0 = time.monotonic()
    status = json.loads(run(*ctl, "status").stdout)
    timings["first_ctl_s"] = round(time.monotonic() - t0, 2)
    summary["status"] = {k: status.get(k) for k in ("instance", "state", "ports", "workers")}
    summary["status_metrics"] = status.get("metrics")
    check(status["state"] == "running", f"status: {status}")
    check(status["ports"] == [bdf_a, bdf_b], f"status ports: {status['ports']}")
    stats_root = json.loads(run(*ctl, "stats").stdout)
    check({p["name"] for p in stats_root["ports"]} == {bdf_a, bdf_b}, f"stats: {stats_root}")

    step(f"ixyd-ctl as {OPERATOR} and {OUTSIDER}")
    as_operator = {
        "status": json.loads(run(*ctl, "status", user=OPERATOR).stdout)["state"],
        "stats": sorted(
            p["name"] for p in json.loads(run(*ctl, "stats", user=OPERATOR).stdout)["ports"]
        ),
    }
    check(as_operator == {"status": "running", "stats": sorted([bdf_a, bdf_b])}, f"{as_operator}")
    change = run(*ctl, "set-forward", bdf_b, "drop", user=OPERATOR, ok=False)
    as_operator["set_forward"] = [change.returncode, change.stderr.strip()]
    check(change.returncode == 4, f"{OPERATOR} changed the forwarding: {change}")
    outsider = run(*ctl, "status", user=OUTSIDER, ok=False)
    as_operator["outsider_status"] = [outsider.returncode, outsider.stderr.strip()]
    check(outsider.returncode == 4, f"{OUTSIDER} reached the daemon: {outsider}")
    summary["access"] = as_operator

    step("traffic")
    t0 = time.monotonic()

    def done_sending() -> bool:
        c = counters(instance)
        return c[bdf_a]["generated"] >= GENERATE_COUNT and c[bdf_a]["rx_packets"] > 0

    finished = wait_for(done_sending, COUNTER_TIMEOUT, interval=0.5)
    timings["traffic_s"] = round(time.monotonic() - t0, 2)
    time.sleep(0.5)  # the last reflected frames
    c = counters(instance)
    keys = ("generated", "tx_packets", "rx_packets", "forwarded", "dropped_by_mode")
    summary["counters"] = {name: {k: c[name].get(k) for k in keys} for name in c}
    a, b = c[bdf_a], c[bdf_b]
    check(finished, f"A did not send {GENERATE_COUNT} frames and get some back: {c}")
    check(a["generated"] == a["tx_packets"] == GENERATE_COUNT, f"A sent: {summary['counters']}")
    check(0 < b["rx_packets"] <= GENERATE_COUNT, f"B received: {summary['counters']}")
    check(0 < b["tx_packets"] == b["forwarded"], f"B reflected: {summary['counters']}")
    check(0 < a["rx_packets"] <= b["tx_packets"], f"A got back: {summary['counters']}")

    step("metrics")
    samples = scrape()
    summary["metrics"] = {
        "series": len(samples),
        "ixyd_series": sum(1 for k in samples if k.startswith("ixyd_")),
        "packets": {
            bdf: {
                name: sample(samples, name, bdf)
                for name in ("ixyd_receive_packets_total", "ixyd_transmit_packets_total")
            }
            for bdf in (bdf_a, bdf_b)
        },
    }
    check(summary["metrics"]["ixyd_series"] > 0, f"no ixyd_ series: {summary['metrics']}")
    packets = summary["metrics"]["packets"]
    check(
        all(v is not None and v > 0 for p in packets.values() for v in p.values()),
        f"packet counters in the metrics: {packets}",
    )


def after_stop(
    summary: dict, instance: str, unit: str, bdf_a: str, bdf_b: str, groups: dict, uid: int
) -> None:
    props = unit_properties(unit, "ActiveState", "Result", "ExecMainStatus")
    socket_unit = unit_properties(f"ixyd@{instance}.socket", "ActiveState")["ActiveState"]
    summary["stopped"] = {**props, "socket_unit": socket_unit}
    check(props["ActiveState"] == "inactive", f"after stop: {props}")
    check(props["Result"] == "success", f"after stop: {props}")
    check(socket_unit == "inactive", f"socket unit after stop: {socket_unit}")

    def on_igb() -> bool:
        return all(guest_pci.bound_driver(bdf) == "igb" and netdevs(bdf) for bdf in (bdf_a, bdf_b))

    wait_for(on_igb, 10.0)  # the netdevs appear while igb probes
    summary["after"] = {
        bdf: {"driver": guest_pci.bound_driver(bdf), "netdevs": netdevs(bdf)}
        for bdf in (bdf_a, bdf_b)
    }
    check(on_igb(), f"ports not back on igb with their netdevs: {summary['after']}")
    leftovers = {
        "socket": (RUN_DIR / f"{instance}.sock").exists(),
        "group_records": sorted(os.listdir(RUN_DIR / "vfio")),
        "vfio_nodes": [g for g in groups.values() if Path(f"/dev/vfio/{g}").exists()],
        "processes": processes_of(uid),
    }
    summary["leftovers"] = leftovers
    check(
        leftovers == {"socket": False, "group_records": [], "vfio_nodes": [], "processes": []},
        f"left behind after stop: {leftovers}",
    )
    summary["dmar_faults"] = dmar_faults()
    check(summary["dmar_faults"] == [], f"DMAR faults: {summary['dmar_faults']}")
    # what the daemon and its root helpers logged as warning or worse, start to stop
    warnings = run("journalctl", "--no-pager", "-o", "cat", "-p", "warning", "-u", unit)
    summary["unit_warnings"] = [line for line in warnings.stdout.splitlines() if line.strip()]


def main() -> int:
    os.sched_setaffinity(0, {0})  # the daemon's workers poll on CPU 1
    summary: dict = {"scenario": "systemd_vfio", "generate_count": GENERATE_COUNT}
    timings: dict = {}
    summary["timings"] = timings
    return run_and_report(summary, lambda: scenario(summary, timings))


if __name__ == "__main__":
    sys.exit(main())
