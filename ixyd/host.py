"""`ixyd-host`: what root does on the host around the daemon, which runs unprivileged.

    ixyd-host install [--root DIR | --runtime] [--tap]   units, accounts, directories, udev
    ixyd-host prepare [--group ixyd] INSTANCE            ExecStartPre=+ of ixyd@.service
    ixyd-host release [--if-stopped-cleanly] INSTANCE    ExecStopPost=+ of ixyd@.service

The units run prepare, release and reload as `python -I -m ...` (isolated from the daemon
user's HOME and site-packages, see ixyd@.service).

`install` writes systemd/ixyd@.service, ixyd@.socket and ixyd-metrics@.socket (with the
directory of the `ixyd` executables and their interpreter filled in), the generator that
gives each metrics socket its instance's address, etc/sysusers.d, etc/tmpfiles.d and the
udev rule, then applies
them: systemd-sysusers creates the users, systemd-tmpfiles the directories, udev and
systemd reload their rules and units when they run.

`prepare` binds each vfio port of the instance to vfio-pci (pci.bind_vfio: refuses a NIC
whose kernel interface is up with addresses unless the instance sets force_bind) and makes
its /dev/vfio/<group> group-owned by the daemon's group, mode 0660. Before it binds, it
marks the IOMMU group in /run/ixyd/vfio/<group> (a JSON record: instance, devices and
their kernel drivers before), which the udev rule matches so that udev keeps the node's
ownership, and which `release` reads to give each device back to the driver it had.
Model ports need nothing: an instance of model ports only is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import importlib.util
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .config import check_instance_name, config_path, load
from .device import PciIds
from .drivers.selection import driver_for
from .errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    IxydError,
    UnsupportedDeviceError,
)
from .pci import VFIO_PCI, Binding, PciBindError, PciDeviceInfo, Sysfs, bind_vfio, release

log = logging.getLogger("ixyd.host")

DAEMON_GROUP = "ixyd"  # User=/Group= of ixyd@.service, made by sysusers.d/ixyd.conf
OPS_GROUP = "ixyd-ops"  # SocketGroup= of ixyd@.socket: who may read with ixyd-ctl
MARK_DIR = "/run/ixyd/vfio"  # IOMMU groups handed to ixyd; the udev rule tests for them
DEV_VFIO = "/dev/vfio"
GROUP_NODE_MODE = 0o660
NODE_TIMEOUT = 5.0  # seconds for /dev/vfio/<group> to appear after the bind
PCI_CLASS_NETWORK = 0x02  # base class (top byte of sysfs `class`): network controller
SETTLE_TIMEOUT = 10  # seconds `udevadm settle` may wait for udev to handle the bind
SYSTEMCTL_TIMEOUT = 10  # seconds for systemctl to queue a job (--no-block)


# What `install` writes: (source relative to the share dir, destination dir key, file name)
UNIT_FILES = ("systemd/ixyd@.service", "systemd/ixyd@.socket", "systemd/ixyd-metrics@.socket")
# The generator that gives each ixyd-metrics@<instance>.socket the instance's `metrics`
# address (ixyd/generator.py); run by the daemon's Python, isolated (-I: no user site,
# no script directory on sys.path), as systemd runs generators as root.
GENERATOR_NAME = "ixyd-metrics-generator"
GENERATOR = """\
#!{python} -I
# Written by `ixyd-host install`. systemd runs it at boot and on every daemon-reload
# (systemd.generator(7)): ListenStream= of ixyd-metrics@<instance>.socket from `metrics`
# in /etc/ixyd/<instance>.toml. See ixyd/generator.py.
import sys

from ixyd.generator import main

sys.exit(main())
"""
CONFIG_FILES = (
    ("etc/sysusers.d/ixyd.conf", "sysusers"),
    ("etc/tmpfiles.d/ixyd.conf", "tmpfiles"),
    ("etc/udev/rules.d/70-ixyd-vfio.rules", "udev"),
)
TAP_DROP_IN = """\
# Written by `ixyd-host install --tap`: what the tap forwarding mode needs on top of
# ixyd@.service's sandbox (creating a TAP interface: /dev/net/tun, CAP_NET_ADMIN, netlink).
[Service]
CapabilityBoundingSet=CAP_NET_ADMIN
AmbientCapabilities=CAP_NET_ADMIN
DeviceAllow=/dev/net/tun rw
RestrictAddressFamilies=AF_NETLINK
"""
TAP_DROP_IN_NAME = "ixyd@.service.d/50-tap.conf"
# ixyd@.service has ProtectHome=yes: the daemon sees these as empty (or not at all), so an
# ixyd, Python or package below them fails the unit with 203/EXEC or an ImportError.
HIDDEN_FROM_DAEMON = ("/root", "/home", "/run/user")
# What the daemon imports besides the standard library (pyproject dependencies).
DAEMON_MODULES = ("ixyd", "_cffi_backend", "prometheus_client", "pyroute2", "systemd")
# ExecStopPost= sees the main process' exit status in $EXIT_STATUS. systemd's own codes
# (systemd.exec(5), "Process exit codes": 200 CHDIR .. 243 CREDENTIALS) mean it could not
# start the daemon, and ixyd's EXIT_CONFIG a configuration it refused: restarting does not
# help (the unit's RestartPreventExitStatus=), so the NICs go back to their drivers.
SYSTEMD_EXEC_STATUSES = range(200, 244)
# ExecStartPre=+ and ExecStopPost=+ inherit what systemd sets up for User=ixyd: HOME=/var/lib/ixyd
# (which user ixyd may write), USER, LOGNAME and SHELL of ixyd (systemd.exec(5), "Environment
# Variables in Spawned Processes"; Environment= would change the daemon's too). The programs
# ixyd-host runs as root get root's environment instead.
ROOT_ENVIRONMENT = {
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}

# Where the files go: persistent (/etc, for a system a package manager does not own)
# or runtime (/run, gone at reboot; for read-only roots and throwaway test machines).
DESTINATIONS = {
    "etc": {
        "units": "etc/systemd/system",
        "sysusers": "etc/sysusers.d",
        "tmpfiles": "etc/tmpfiles.d",
        "udev": "etc/udev/rules.d",
        "generators": "etc/systemd/system-generators",
    },
    "run": {
        "units": "run/systemd/system",
        "sysusers": "run/sysusers.d",
        "tmpfiles": "run/tmpfiles.d",
        "udev": "run/udev/rules.d",
        "generators": "run/systemd/system-generators",
    },
}


class HostError(IxydError):
    """A host step (install, prepare, release) failed; the message says what to do."""


# ---------------------------------------------------------------------------- install
def share_dir() -> Path:
    """Where the unit and configuration files are: the source tree of an editable install,
    else <prefix>/share/ixyd, where the wheel puts them (pyproject data-files)."""
    checkout = Path(__file__).resolve().parent.parent
    for candidate in (checkout, Path(sys.prefix) / "share" / "ixyd"):
        if (candidate / UNIT_FILES[0]).is_file():
            return candidate
    raise HostError(
        f"the ixyd unit files are neither in {checkout}/systemd nor in "
        f"{sys.prefix}/share/ixyd/systemd: reinstall ixyd (pip install) to get them"
    )


def default_bin_dir() -> str:
    """The directory of the `ixyd` executable of this installation (its venv's bin/)."""
    return sysconfig.get_path("scripts")


def render_unit(text: str, bin_dir: str, python: str) -> str:
    """A unit template with @BINDIR@ and @PYTHON@ (the interpreter of ixyd-host, which the
    "+" lines run with -I) replaced."""
    return text.replace("@BINDIR@", bin_dir.rstrip("/") or "/").replace("@PYTHON@", python)


def host_interpreter(root: str, bin_dir: str) -> str:
    """The Python that runs bin_dir/ixyd-host (its #! line), as the units name it. Raises
    HostError when that is not an absolute path to a python (e.g. `#!/usr/bin/env`)."""
    script = os.path.join(root, bin_dir.lstrip("/"), "ixyd-host")
    python = _interpreter(script)
    if python is None or not os.path.basename(python).startswith("python"):
        raise HostError(
            f"{script} does not name its Python on its #! line ({python or 'none'}): the "
            "units run ixyd-host's module with that interpreter in isolated mode (-I); "
            "install ixyd with pip into a venv, which writes the interpreter's path there"
        )
    return python


@dataclass(frozen=True)
class Installed:
    """What install wrote (absolute paths) and which follow-up commands it ran."""

    files: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]


def install(
    root: str = "/",
    *,
    runtime: bool = False,
    tap: bool = False,
    bin_dir: str | None = None,
    apply: bool = True,
) -> Installed:
    """Install the units and the sysusers, tmpfiles and udev files below `root`, then (if
    `apply`) create the accounts and directories and reload udev and systemd. With a root
    other than /, only what works offline runs (systemd-sysusers/-tmpfiles --root); udev
    and systemd are left alone. Raises HostError naming the step that failed."""
    bin_dir = bin_dir or default_bin_dir()
    if not os.path.isabs(bin_dir):
        raise HostError(f"--bin-dir must be an absolute path, got {bin_dir!r}")
    for program in ("ixyd", "ixyd-host"):
        path = os.path.join(root, bin_dir.lstrip("/"), program)
        if not os.access(path, os.X_OK):
            raise HostError(
                f"{path} is not an executable: the units run ixyd from {bin_dir}; pass "
                "--bin-dir with the directory that has ixyd and ixyd-host"
            )
    programs, paths = _what_the_units_run(root, bin_dir)
    # root runs ExecStartPre=+/ExecStopPost=+ from there: whoever may change those files
    # (or replace them through a directory on the way) gets root
    writable = [why_not_root_only(p, root) for p in dict.fromkeys([bin_dir, *programs, *paths])]
    writable = list(dict.fromkeys(w for w in writable if w))
    if writable:
        raise HostError(
            f"root runs {bin_dir}/ixyd-host from the units, but users other than root may "
            "change what it runs:\n  " + "\n  ".join(writable) + "\nInstall ixyd as root "
            'into a directory only root can write, e.g. /opt/ixyd (README, "Deploy").'
        )
    problems = daemon_cannot_run(root, bin_dir)
    if problems:
        raise HostError(
            f"the daemon could not run from {bin_dir}: ixyd@.service runs it as user "
            f"{DAEMON_GROUP} with ProtectHome=yes, which hides {', '.join(HIDDEN_FROM_DAEMON)}"
            ":\n  " + "\n  ".join(problems) + "\nInstall ixyd into a venv made from a system "
            "Python outside those directories, e.g. `/usr/bin/python3 -m venv /opt/ixyd && "
            "/opt/ixyd/bin/pip install <ixyd checkout or wheel>`, and run "
            '/opt/ixyd/bin/ixyd-host install (README, "Deploy").'
        )
    python = host_interpreter(root, bin_dir)
    source = share_dir()
    where = DESTINATIONS["run" if runtime else "etc"]
    written = []

    def put(text: str, directory: str, name: str, mode: int = 0o644) -> None:
        target = Path(root, directory, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(text)
        temporary.chmod(mode)
        os.replace(temporary, target)
        written.append(str(target))

    for unit in UNIT_FILES:
        text = render_unit((source / unit).read_text(), bin_dir, python)
        put(text, where["units"], os.path.basename(unit))
    if tap:
        put(TAP_DROP_IN, where["units"], TAP_DROP_IN_NAME)
    else:
        with contextlib.suppress(FileNotFoundError):  # install without --tap takes it away
            os.unlink(Path(root, where["units"], TAP_DROP_IN_NAME))
    for name, key in CONFIG_FILES:
        put((source / name).read_text(), where[key], os.path.basename(name))
    # the generator runs as root at boot: the same interpreter as the units' root lines, -I
    put(GENERATOR.format(python=python), where["generators"], GENERATOR_NAME, 0o755)
    commands = _apply_commands(root, runtime) if apply else []
    for command in commands:
        _run(command)
    return Installed(tuple(written), tuple(tuple(c) for c in commands))


def _resolve_below(root: str, path: str) -> str:
    """`path` (absolute, as the daemon sees it) with its symbolic links followed inside
    `root`, as far as they exist there; returned as the daemon sees it."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        if part == ".":
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate) and hops < 40:
            hops += 1
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def why_daemon_cannot_reach(path: str, root: str = "/", execute: bool = False) -> str | None:
    """Why user ixyd under ixyd@.service's sandbox cannot read (or `execute`) `path`
    (absolute, as seen from inside `root`), or None: a path below HIDDEN_FROM_DAEMON
    (symbolic links followed), or a directory on the way that others may not enter, or a
    file others may not read or run. Paths that do not exist below `root` are only checked
    by name."""
    real = _resolve_below(root, path)
    for hidden in HIDDEN_FROM_DAEMON:
        if real == hidden or real.startswith(hidden + "/"):
            shown = path if real == path else f"{path} (that is {real})"
            return f"{shown} is below {hidden}"
    on_disk = os.path.join(root, real.lstrip("/"))
    if not os.path.exists(on_disk):
        return None
    directory = os.path.dirname(real)
    while directory != "/":  # (not / itself: a scratch root's top may be private)
        mode = os.stat(os.path.join(root, directory.lstrip("/"))).st_mode
        if not mode & stat.S_IXOTH:
            return f"{directory} (on the way to {path}) may not be entered by others"
        directory = os.path.dirname(directory)
    mode = os.stat(on_disk).st_mode
    if not mode & stat.S_IROTH:
        return f"{real} may not be read by others"
    if execute and not mode & stat.S_IXOTH:
        return f"{real} may not be run by others"
    return None


def _interpreter(script: str) -> str | None:
    """The program a script's #! line names, or None for a binary or a relative name."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words and words[0].startswith("/") else None


def why_not_root_only(path: str, root: str = "/") -> str | None:
    """Why someone other than root could change `path` (absolute, as seen inside `root`),
    or None: it, or a directory on the way to it (symbolic links followed), is owned by
    another user or writable by its group or others. A directory with the sticky bit (like
    /tmp) may be writable by all: others cannot replace root's entries in it. What does not
    exist below `root` is not checked, nor (for a root other than /) `root` itself."""
    real = _resolve_below(root, path)
    top = "/" if os.path.realpath(root) == "/" else None
    current = real
    while current != top:
        try:
            st = os.stat(os.path.join(root, current.lstrip("/")))
        except FileNotFoundError:
            st = None
        if st is not None:
            if current == real:
                where = path if real == path else f"{path} (that is {real})"
            else:
                where = f"{current} (on the way to {path})"
            if st.st_uid != 0:
                return f"{where} is owned by uid {st.st_uid}, not root"
            sticky_directory = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_directory:
                return (
                    f"{where} is writable by its group or others (mode {st.st_mode & 0o7777:04o})"
                )
        if current == "/":
            break
        current = os.path.dirname(current)
    return None


def _what_the_units_run(root: str, bin_dir: str) -> tuple[list[str], list[str]]:
    """The programs the units run (ixyd, ixyd-host in bin_dir and their interpreters) and,
    when bin_dir is this installation's, the standard library and the modules the daemon
    and the root helpers import."""
    programs, paths = [], []
    for program in ("ixyd", "ixyd-host"):
        path = os.path.join(bin_dir, program)
        programs.append(path)
        interpreter = _interpreter(os.path.join(root, path.lstrip("/")))
        if interpreter:
            programs.append(interpreter)
    this_installation = os.path.realpath(root) == "/" and os.path.realpath(
        bin_dir
    ) == os.path.realpath(default_bin_dir())
    if this_installation:
        paths.append(sysconfig.get_path("stdlib"))
        for name in DAEMON_MODULES:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin not in (None, "built-in", "frozen"):
                paths.append(spec.origin)
    return programs, paths


def daemon_cannot_run(root: str, bin_dir: str) -> list[str]:
    """What keeps the units' ExecStart= from running (see why_daemon_cannot_reach): the
    programs in bin_dir, their interpreter and, when bin_dir is this installation's, the
    standard library and the modules the daemon imports. Empty when all is well."""
    programs, paths = _what_the_units_run(root, bin_dir)
    problems = []
    checks = [(p, True) for p in dict.fromkeys(programs)] + [(p, False) for p in paths]
    for path, execute in checks:
        problem = why_daemon_cannot_reach(path, root, execute)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _apply_commands(root: str, runtime: bool) -> list[list[str]]:
    offline = os.path.realpath(root) != "/"
    # a bare file name: both tools look it up in their directories (below --root), /etc
    # and /run included; a path would be opened as it is, outside the root
    sysusers = ["systemd-sysusers", *([f"--root={root}"] if offline else []), "ixyd.conf"]
    tmpfiles = [
        "systemd-tmpfiles",
        "--create",
        *([f"--root={root}"] if offline else []),
        "ixyd.conf",
    ]
    commands = [tmpfiles] if not offline and _accounts_exist() else [sysusers, tmpfiles]
    if offline:
        return commands
    if os.path.exists("/run/udev/control"):  # udevd runs
        commands.append(["udevadm", "control", "--reload"])
    if os.path.isdir("/run/systemd/system"):  # booted with systemd (sd_booted(3))
        commands.append(["systemctl", "daemon-reload"])
    return commands


def _accounts_exist() -> bool:
    """Whether sysusers.d/ixyd.conf has nothing left to do here (then it is not run: a
    read-only /etc, as in a test VM sharing the host's root, would make it fail)."""
    try:
        pwd.getpwnam(DAEMON_GROUP)
        grp.getgrnam(DAEMON_GROUP)
        grp.getgrnam(OPS_GROUP)
    except KeyError:
        return False
    return True


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=ROOT_ENVIRONMENT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"`{' '.join(command)}` failed: {exc}") from None
    if done.returncode != 0:
        raise HostError(
            f"`{' '.join(command)}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )


# ---------------------------------------------------------------------------- prepare
def _mark_path(group: int, mark_dir: str) -> str:
    return os.path.join(mark_dir, str(group))


def _read_mark(path: str) -> dict | None:
    try:
        with open(path) as f:
            mark = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HostError(f"{path} is not an ixyd group record ({exc}); remove it") from None
    if not isinstance(mark, dict) or not isinstance(mark.get("devices"), dict):
        raise HostError(f"{path} is not an ixyd group record; remove it")
    return mark


def _write_mark(path: str, mark: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(mark, f)
    os.replace(temporary, path)


def _settle_udev() -> None:
    """Let udev handle the new /dev/vfio node first, so it cannot undo our chown later."""
    if os.path.exists("/run/udev/control") and shutil.which("udevadm"):
        subprocess.run(
            ["udevadm", "settle", f"--timeout={SETTLE_TIMEOUT}"],
            capture_output=True,
            check=False,
            env=ROOT_ENVIRONMENT,
        )


def _load_vfio_module(sysfs: Sysfs) -> None:
    if not sysfs.exists("bus", "pci", "drivers", VFIO_PCI) and shutil.which("modprobe"):
        subprocess.run(
            ["modprobe", VFIO_PCI], capture_output=True, check=False, env=ROOT_ENVIRONMENT
        )


def prepare(
    instance: str,
    group: str = DAEMON_GROUP,
    *,
    sysfs: Sysfs | None = None,
    dev_dir: str = DEV_VFIO,
    mark_dir: str = MARK_DIR,
) -> list[Binding]:
    """Bind every vfio port of `instance` to vfio-pci and give `group` its /dev/vfio node.

    Reads the instance's configuration (/etc/ixyd/<instance>.toml, or a bare PCI address).
    Checks every port before it changes anything. Returns the bindings (empty for model
    ports only). Raises ConfigError for a bad configuration (one that someone other than
    root may change, or a function no ixyd driver drives), PciBindError when a NIC cannot
    be taken (in use, IOMMU off, group not viable), HostError when the group is missing or
    another instance or VFIO user holds the IOMMU group.
    """
    check_instance_name(instance)
    path = config_path(instance)
    problem = why_not_root_only(path) if os.path.exists(path) else None
    if problem:
        raise ConfigError(
            f"{path}: {problem}: root runs `ixyd-host prepare` with what it says; "
            f"`chown root:root {path}; chmod go-w {path}` (and its directories)"
        )
    config = load(instance)
    ports = [p for p in config.ports if p.backend == "vfio"]
    if not ports:
        log.info("%s: model ports only, nothing to bind", instance)
        return []
    sysfs = sysfs or Sysfs()
    ours = {spec.address for spec in ports}
    for spec in ports:
        info = PciDeviceInfo.read(spec.address, sysfs)
        _refuse_unsupported(info)
        _refuse_foreign_vfio_members(info, ours, instance, sysfs)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise HostError(
            f"group {group!r} does not exist: run `ixyd-host install` (systemd-sysusers)"
        ) from None
    _load_vfio_module(sysfs)
    bindings = []
    for spec in ports:
        info = PciDeviceInfo.read(spec.address, sysfs)
        if info.iommu_group is None:  # bind_vfio says why and what to do
            bindings.append(bind_vfio(spec.address, force=config.force_bind, sysfs=sysfs))
            continue
        path = _mark_path(info.iommu_group, mark_dir)
        mark = _read_mark(path) or {"instance": instance, "devices": {}}
        if mark.get("instance") != instance:
            raise HostError(
                f"{spec.address}: IOMMU group {info.iommu_group} is held by ixyd instance "
                f"{mark.get('instance')!r} ({path}); all functions of a group belong to one "
                "instance"
            )
        # marked before the bind, so the udev rule already matches the node's add event
        # after a failed run the device is still on vfio-pci: keep what it had before that
        before = mark["devices"].setdefault(
            spec.address, {"driver": info.driver, "netdevs": list(info.netdevs)}
        )
        mark["give_back"] = config.give_back
        _write_mark(path, mark)
        try:
            binding = bind_vfio(spec.address, force=config.force_bind, sysfs=sysfs)
        except BaseException:
            if sysfs.driver(spec.address) != VFIO_PCI:  # not taken: not ours to record
                del mark["devices"][spec.address]
                if mark["devices"]:
                    _write_mark(path, mark)
                else:
                    os.unlink(path)
            raise
        bindings.append(binding)
        _settle_udev()
        _grant_group_node(os.path.join(dev_dir, str(info.iommu_group)), gid, group)
        log.info(
            "%s: on vfio-pci (was %s), %s/%d for group %s",
            spec.address,
            before["driver"] or "unbound",
            dev_dir,
            info.iommu_group,
            group,
        )
    return bindings


def _refuse_unsupported(info: PciDeviceInfo) -> None:
    """ConfigError unless an ixyd driver drives the function: a network controller whose
    vendor/device ID a driver lists (drivers.selection). Without this, prepare would take
    any device it is given (a disk controller) from its driver, and the daemon refuse it
    only afterwards."""
    if info.class_code >> 16 != PCI_CLASS_NETWORK:
        raise ConfigError(
            f"{info.address} is not a network controller (PCI class {info.class_code:#08x}, "
            f"IDs {info.vendor_id:04x}:{info.device_id:04x}): ixyd drives Intel NICs only; "
            "check the address in the configuration (`lspci -D -nn` lists them)"
        )
    try:
        driver_for(info.address, PciIds(info.vendor_id, info.device_id))
    except UnsupportedDeviceError as exc:
        raise ConfigError(f"{exc}. It stays with its driver") from None


def _refuse_foreign_vfio_members(
    info: PciDeviceInfo, ours: set[str], instance: str, sysfs: Sysfs
) -> None:
    """HostError when another member of the function's IOMMU group is on vfio-pci but is
    not a port of this instance: whoever bound it (a VM, another VFIO program) can open
    the group, and handing its /dev/vfio node to ixyd would give ixyd that device too."""
    if info.iommu_group is None:
        return
    for member in info.group_members:
        if member not in ours and sysfs.driver(member) == VFIO_PCI:
            raise HostError(
                f"{info.address}: IOMMU group {info.iommu_group} also holds {member}, which "
                f"is on vfio-pci but is not a port of instance {instance!r}: someone else "
                f"uses that group. Add {member} to the instance's ports, or give it back to "
                "its driver (`ixyd-host release` of the instance that bound it)"
            )


def _grant_group_node(node: str, gid: int, group: str) -> None:
    deadline = time.monotonic() + NODE_TIMEOUT
    while not os.path.exists(node):
        if time.monotonic() >= deadline:
            raise HostError(f"{node} did not appear within {NODE_TIMEOUT:g} s of the bind")
        time.sleep(0.02)
    try:
        os.chown(node, 0, gid)
        os.chmod(node, GROUP_NODE_MODE)
    except OSError as exc:
        raise HostError(f"cannot give group {group} access to {node}: {exc}") from None


# ---------------------------------------------------------------------------- release
def release_instance(
    instance: str,
    *,
    sysfs: Sysfs | None = None,
    dev_dir: str = DEV_VFIO,
    mark_dir: str = MARK_DIR,
) -> list[str]:
    """Undo `prepare` for `instance`: every device it took from a kernel driver goes back
    to it (unless give_back = false), the /dev/vfio node back to root 0600, the record is
    removed. Returns the addresses given back. Devices that were unbound or already on
    vfio-pci stay on vfio-pci. Raises PciBindError if the kernel refuses."""
    sysfs = sysfs or Sysfs()
    returned = []
    for name in sorted(os.listdir(mark_dir)) if os.path.isdir(mark_dir) else []:
        path = os.path.join(mark_dir, name)
        if not name.isdigit():
            continue
        mark = _read_mark(path)
        if mark is None or mark.get("instance") != instance:
            continue
        for address, before in sorted(mark["devices"].items()):
            driver = before.get("driver")
            if not mark.get("give_back", True) or driver in (None, VFIO_PCI):
                continue
            if sysfs.driver(address) != VFIO_PCI:
                continue  # someone else moved it already
            previous = Binding(address, driver, tuple(before.get("netdevs", ())), int(name))
            netdevs = release(address, sysfs=sysfs, previous=previous)
            log.info("%s: back on %s, interfaces %s", address, sysfs.driver(address), netdevs)
            returned.append(address)
        node = os.path.join(dev_dir, name)
        with contextlib.suppress(FileNotFoundError):  # gone with the last vfio-pci device
            os.chown(node, 0, 0)
            os.chmod(node, 0o600)
        os.unlink(path)
    return returned


def restart_may_follow(environ) -> bool:
    """Whether ExecStopPost= should keep the NICs on vfio-pci for a restart, from what
    systemd tells it: not after a clean stop, not when the daemon never ran (prepare
    failed: $EXIT_CODE is unset; or systemd could not start it: a 2xx status, the
    executable or the sandbox is wrong) and not after ixyd refused its configuration (the
    unit prevents that restart); yes after a crash, a watchdog kill or a device error.
    A restart binds the NICs again (prepare), so giving back too eagerly costs only time."""
    if environ.get("SERVICE_RESULT", "success") == "success":
        return False
    if not environ.get("EXIT_CODE"):  # no main process: ExecStartPre= (prepare) failed
        return False
    status = environ.get("EXIT_STATUS", "")
    if environ.get("EXIT_CODE") == "exited" and status.isdigit():
        code = int(status)
        if code == EXIT_CONFIG or code in SYSTEMD_EXEC_STATUSES:
            return False
    return True


def stop_socket(instance: str) -> None:
    """Stop ixyd@INSTANCE.socket after a start that failed for good. A listening socket
    starts its service again for the next client, so a client waiting on it (or any that
    connects later) would start the same failure over, up to the start limit, and then be
    cut off unanswered. Stopped, it answers "not running" and `ixyd-ctl` shows why from the
    failed unit; `systemctl start ixyd@INSTANCE` starts both again. Only the socket: the
    service's failed start job is left to finish (--job-mode=ignore-dependencies)."""
    unit = f"ixyd@{instance}.socket"
    command = ["systemctl", "stop", "--no-block", "--job-mode=ignore-dependencies", "--", unit]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot stop %s: %s", unit, exc)
        return
    if done.returncode != 0:
        log.warning("cannot stop %s: %s", unit, done.stderr.strip())
    else:
        log.info("%s: failed for good, stopping %s too", instance, unit)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ixyd-host", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "install", help="install the systemd units, accounts, directories and udev rule"
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--root", default="/", help="install below this directory (offline)")
    target.add_argument(
        "--runtime", action="store_true", help="into /run (gone at reboot) instead of /etc"
    )
    p.add_argument(
        "--tap", action="store_true", help="also allow the tap forwarding mode (CAP_NET_ADMIN)"
    )
    p.add_argument("--bin-dir", help=f"where ixyd and ixyd-host are (default {default_bin_dir()})")
    p.add_argument(
        "--no-apply", action="store_true", help="only write the files (no sysusers, tmpfiles, ...)"
    )
    p = commands.add_parser("prepare", help="bind an instance's NICs to vfio-pci (as root)")
    p.add_argument("--group", default=DAEMON_GROUP, help="the daemon's group (default ixyd)")
    p.add_argument("instance", help="the instance: a PCI address or a name in /etc/ixyd")
    p = commands.add_parser("release", help="give an instance's NICs back to their drivers")
    p.add_argument(
        "--if-stopped-cleanly",
        action="store_true",
        help="as ExecStopPost=: keep the NICs on vfio-pci when systemd will restart the "
        "daemon after a failure ($SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS)",
    )
    p.add_argument("instance")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ixyd-host: %(message)s", stream=sys.stderr)
    try:
        if args.command == "install":
            done = install(
                args.root,
                runtime=args.runtime,
                tap=args.tap,
                bin_dir=args.bin_dir,
                apply=not args.no_apply,
            )
            for path in done.files:
                print(f"installed {path}")
            for command in done.commands:
                print(f"ran {' '.join(command)}")
        elif args.command == "prepare":
            prepare(args.instance, args.group)
        else:
            keep = args.if_stopped_cleanly and restart_may_follow(os.environ)
            if keep:
                log.info(
                    "%s: stopped with result %s: its NICs stay on vfio-pci for the restart "
                    "(`ixyd-host release %s` gives them back)",
                    args.instance,
                    os.environ.get("SERVICE_RESULT"),
                    args.instance,
                )
                return EXIT_OK
            released = release_instance(args.instance)
            log.info("%s: gave back %s", args.instance, ", ".join(released) or "no NIC")
            # failed, and no restart follows (else `keep`): a refused configuration, ...
            if args.if_stopped_cleanly and os.environ.get("SERVICE_RESULT", "success") != "success":
                stop_socket(args.instance)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        _status_for_systemd(args.command, f"configuration: {exc}")
        return EXIT_CONFIG
    except (HostError, PciBindError, IxydError) as exc:
        log.error("%s", exc)
        _status_for_systemd(args.command, str(exc))
        return EXIT_FAILED
    return EXIT_OK


def _status_for_systemd(command: str, why: str) -> None:
    """As ExecStartPre=/ExecStopPost= (NotifyAccess=exec): put why this step failed in the
    unit's status line, which `systemctl status` shows with the failed unit. Outside
    systemd ($NOTIFY_SOCKET unset) nothing happens."""
    from .sdnotify import Notifier

    Notifier.from_environment().status(f"ixyd-host {command} failed: {why}")


if __name__ == "__main__":
    sys.exit(main())
