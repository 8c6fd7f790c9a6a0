"""Run a command as root inside a QEMU guest with a virtual Intel IOMMU and two igb NICs.

The guest is the one of docs/reference/vfio-guest.md (the #marks below name its headings):
QEMU (TCG) q35 with `intel-iommu` (DMA and interrupt remapping), two emulated igb (82576,
8086:10c9) behind their own PCIe root ports, joined back to back by a QEMU hub, and a Debian
kernel that boots straight into this host's own userland: the host's root is the guest's
root, read-only over 9p, so the repo, its .venv and the compiled modules are at the same
paths.

    ensure_host()       install QEMU and build the guest kernel + initramfs (cached)
    run_in_guest(cmd)   boot, run cmd as root (cwd = repo root), power off -> GuestResult

Guest PCI topology (#pci-topology; fixed by the QEMU command line below, the same every boot):

    BDF            MAC                 QEMU device      IOMMU group
    0000:02:00.0   52:54:00:00:00:01   igb on rp1       its own (7 observed)
    0000:01:00.0   52:54:00:00:00:02   igb on rp2       its own (8 observed)

The two ports are wired to each other: a frame sent on one arrives on the other. Identify
a port by its MAC (RAL0/RAH0, or the netdev's address under igb), never by the order of
the -device options: see IGB_PORTS and scenarios/guest_pci.py:igb_addresses_in_guest().

Run by hand from the repo root (prints the command's output, exits with its code):
    .venv/bin/python tests/vm/harness.py [--igb] [--timeout S] [--console] -- COMMAND...
    .venv/bin/python tests/vm/harness.py --init systemd --journal [--igb] -- COMMAND...
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ixyd.vm")

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).resolve().parent / "guest_init.sh"  # PID 1 in the guest
GUEST_SYSTEMD = Path(__file__).resolve().parent / "guest_systemd.sh"  # init="systemd": stage 2
SCENARIOS = Path(__file__).resolve().parent / "scenarios"  # guest-side scripts
DEFAULT_CACHE = Path("/var/cache/ixyd-vm")  # outside the repo: fresh clones reuse it


@dataclass(frozen=True)
class GuestIgbPort:
    """One emulated igb function as the guest sees it."""

    bdf: str  # PCI address in the guest
    mac: str  # set on the QEMU command line, read back from RAL0/RAH0
    root_port: str  # QEMU pcie-root-port id it sits behind


IGB_PCI_ID = "8086:10c9"  # 82576 as emulated by QEMU's igb
IGB_PORTS = (
    GuestIgbPort(bdf="0000:02:00.0", mac="52:54:00:00:00:01", root_port="rp1"),
    GuestIgbPort(bdf="0000:01:00.0", mac="52:54:00:00:00:02", root_port="rp2"),
)

# run_in_guest(topology=...): "default" is the table above. "shared-group" puts both igb on
# the conventional PCI bus of one pcie-pci-bridge (behind rp1): DMA from behind a PCIe-to-PCI
# bridge carries the bridge's requester ID, so the kernel puts the bridge and both functions
# into one IOMMU group (observed: group 6 = 01:00.0 bridge, 02:01.0, 02:03.0). Two igb as
# functions 0 and 1 of one slot would not do: the guest kernel enumerates only function 0.
# For tests of a group that is not viable.
TOPOLOGIES = ("default", "shared-group")
INITS = ("script", "systemd")  # run_in_guest(init=...): guest_init.sh or systemd as PID 1
SHARED_GROUP_BRIDGE = "br1"
IGB_PORTS_SHARED_GROUP = (
    GuestIgbPort(bdf="0000:02:01.0", mac="52:54:00:00:00:01", root_port="rp1"),
    GuestIgbPort(bdf="0000:02:03.0", mac="52:54:00:00:00:02", root_port="rp1"),
)
# Bridge slots of the two igb: each PF reserves 8 igbvf slots at devfn + 0x80 (stride 2),
# so slots 1 and 2 would clash ("slot 18 function 0 not available for igbvf"); 1 and 3 don't.
SHARED_GROUP_SLOTS = (1, 3)

# Host packages (#host-packages). QEMU >= 10 comes from bookworm-backports, pinned per package:
# `-t bookworm-backports` would also upgrade systemd and udev on the host.
BACKPORTS = "bookworm-backports"
QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
QEMU_MIN_VERSION = "1:10.0"
# depmod/modprobe; vmlinux and .ko decompression; systemd-udevd and udevadm for the systemd
# guest, where ixyd's udev rule is exercised (a host without udev gets no udevd from it)
TOOL_PACKAGES = ("kmod", "zstd", "xz-utils", "udev")
BACKPORTS_SOURCE = Path("/etc/apt/sources.list.d/ixyd-bookworm-backports.sources")
QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # fastest firmware; enters the ELF kernel via PVH

# Modules the initramfs needs to mount the 9p root (#initramfs); built-in ones are skipped.
INITRAMFS_MODULE_TARGETS = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX_APPLETS = "sh mount umount insmod switch_root mkdir cat echo poweroff".split()  # /init's

# Payload magics inside a vmlinuz (#guest-kernel): zstd for 6.12, xz for 6.1.
KERNEL_PAYLOAD_MAGICS = (b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00")

# /init of the initramfs: load the 9p modules, mount the host root read-only, hand over
# to `rootinit=` (guest_init.sh). With the flag `rootoverlay` on the kernel command line
# (init="systemd") the new root is an overlay instead: the 9p root as its read-only lower
# layer, a tmpfs as the upper one, so that / is writable and every write vanishes with the
# guest. Any change here rebuilds the cached initramfs.
INITRAMFS_INIT = """\
#!/bin/sh
# ixyd test guest, stage 1: mount the host root (9p, read-only; under a tmpfs overlay with
# rootoverlay) and switch_root to rootinit=.
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/order); do
    insmod /lib/modules/$module.ko || echo "initramfs: insmod $module failed"
done
rootinit=/sbin/init
overlay=
for word in $(cat /proc/cmdline); do
    case "$word" in
        rootinit=*) rootinit="${word#rootinit=}" ;;
        rootoverlay) overlay=1 ;;
    esac
done
root=/newroot
[ -n "$overlay" ] && root=/lower
if ! mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose root $root; then
    echo "initramfs: cannot mount the 9p root"
    poweroff -f
fi
if [ -n "$overlay" ]; then
    mount -t tmpfs -o mode=0755 tmpfs /upper
    mkdir /upper/data /upper/work
    if ! mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work \\
            overlay /newroot; then
        echo "initramfs: cannot mount the overlay root"
        poweroff -f
    fi
fi
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot "$rootinit"
"""

GUEST_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The interpreter these tests run under, for scenarios: the guest's root is the host's, so
# the same absolute path works there (a venv's bin/python must not be resolved: it is what
# makes the venv's packages visible). Its directory goes first on the guest's PATH.
GUEST_PYTHON = sys.executable
# 2 MiB hugepages the guest kernel reserves at boot (`hugepages=` on its command line,
# before anything can fragment its memory), so ixyd's DMA memory is physically contiguous.
# QEMU's igb drops a TX frame whose buffer crosses into a 4 KiB guest page that is not
# adjacent in guest-physical memory (docs/vm-guest-dma.md): with 4 KiB pages that is
# random loss. 64 x 2 MiB = 128 MiB of the guest's 1 GiB; two ports with the default pools
# (4,096 buffers each) take 12.
GUEST_HUGEPAGES = 64
GUEST_WIND_DOWN_S = 3.0  # guest keeps this much of the timeout for dmesg + power-off
GUEST_WIND_DOWN_SYSTEMD_S = 8.0  # ... and under systemd for the journal + a forced shutdown
CONSOLE_TAIL_LINES = 40
UNUSED_FOR_S = 24 * 3600  # cached kernels and initramfs images unused this long are removed


class HostSetupError(RuntimeError):
    """The host cannot provide QEMU, the guest kernel or the initramfs; says what failed."""


class GuestError(RuntimeError):
    """The guest produced no result: panic, init failure, QEMU error. `console` has the log."""

    def __init__(self, message: str, console: str = "", output: str | None = None):
        super().__init__(message)
        self.console = console
        self.output = output


class GuestTimeout(GuestError):
    """The command or the whole boot did not finish within the timeout; QEMU was killed
    or the guest's own watchdog stopped the command (then `output` holds what it printed)."""


@dataclass(frozen=True)
class GuestResult:
    """What one guest run gave back."""

    returncode: int  # exit code of the command inside the guest
    output: str  # the command's stdout and stderr, interleaved
    console: str  # full serial console (kernel + init) plus QEMU's own messages
    dmesg: str  # guest kernel log, read after the command ended
    elapsed: float  # seconds, QEMU start to QEMU exit
    boot: float | None = None  # guest uptime (s) when the command started
    journal: str = ""  # init="systemd": the guest's journal (journalctl -b) after the command


@dataclass(frozen=True)
class VmHost:
    """What ensure_host() prepared: everything run_in_guest() needs to boot."""

    cache_dir: Path
    kernel_version: str  # e.g. 6.12.95+deb12-amd64
    kernel_package: str  # the .deb it came from, e.g. linux-image-6.12.95+deb12-amd64
    kroot: Path  # unpacked kernel package: lib/modules/<kernel_version>, boot/
    vmlinux: Path  # uncompressed ELF kernel, booted through its PVH note
    initramfs: Path
    qemu_version: str

    def run(self, command: Sequence[str] | str, **kwargs) -> GuestResult:
        """run_in_guest() on this host; same arguments."""
        return run_in_guest(command, host=self, **kwargs)


# ---------------------------------------------------------------------------------------
# Host setup


def cache_dir() -> Path:
    """The cache directory: $IXYD_VM_CACHE, else /var/cache/ixyd-vm."""
    return Path(os.environ.get("IXYD_VM_CACHE") or DEFAULT_CACHE)


_prepared: VmHost | None = None


def ensure_host() -> VmHost:
    """Install what is missing and build (or reuse) the guest kernel and initramfs.

    Idempotent and non-interactive; after the first call in a process it returns the same
    VmHost at once. Needs root (or password-less sudo) only when packages are missing.
    Set IXYD_VM_KERNEL=<version> (e.g. 6.1.0-56-amd64) to boot a specific Debian kernel.
    Raises HostSetupError with the failing command's output.
    """
    global _prepared
    if _prepared is None:
        cache = cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HostSetupError(f"cannot create the cache {cache} ({e}): set IXYD_VM_CACHE") from e
        with _locked(cache / ".lock"):
            _prepared = _prepare(cache)
    return _prepared


def _prepare(cache: Path) -> VmHost:
    _install_host_packages()
    kernel_package, kernel_version = _prepare_kernel(cache)
    kroot = cache / "kernels" / kernel_version
    busybox = _prepare_busybox(cache)
    initramfs = _prepare_initramfs(cache, kroot, kernel_version, busybox)
    _prune_unused(cache, kroot, initramfs)
    qemu_version = _run([QEMU, "--version"]).splitlines()[0]
    return VmHost(
        cache_dir=cache,
        kernel_version=kernel_version,
        kernel_package=kernel_package,
        kroot=kroot,
        vmlinux=kroot / "boot" / f"vmlinux-{kernel_version}",
        initramfs=initramfs,
        qemu_version=qemu_version,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialises cache updates between concurrent test sessions."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: Sequence[str], *, cwd: Path | None = None, input: bytes | None = None) -> str:
    """Runs a host command; HostSetupError with its output when it fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    try:
        done = subprocess.run(argv, cwd=cwd, input=input, env=env, capture_output=True)
    except FileNotFoundError as e:
        raise HostSetupError(f"{argv[0]}: not found ({e})") from e
    out = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        raise HostSetupError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode}):\n{out[-4000:]}"
        )
    return done.stdout.decode(errors="replace")


def _as_root(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return list(argv)
    if shutil.which("sudo") is None:
        raise HostSetupError(f"need root for `{shlex.join(argv)}`: run as root or install sudo")
    return ["sudo", "-n", *argv]


def _apt_get(*args: str) -> str:
    return _run(_as_root(["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *args]))


def _installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Package -> installed version, for those of `packages` that are installed."""
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev} ${Version}\n", *packages],
        capture_output=True,
        text=True,
    )
    versions = {}
    for line in done.stdout.splitlines():
        name, status, *version = line.split()
        if status == "ii" and version:
            versions[name] = version[0]
    return versions


def _version_at_least(version: str, minimum: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", version, "ge", minimum]).returncode == 0


def _has_backports_source() -> bool:
    sources = [
        Path("/etc/apt/sources.list"),
        *Path("/etc/apt/sources.list.d").glob("*.list"),
        *Path("/etc/apt/sources.list.d").glob("*.sources"),
    ]
    return any(BACKPORTS in p.read_text(errors="replace") for p in sources if p.is_file())


def _debian_mirror() -> str:
    """The Debian archive URI the host already uses (deb.debian.org when none is found)."""
    for source in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for stanza in source.read_text(errors="replace").split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    return "http://deb.debian.org/debian"


def _add_backports_source() -> None:
    codename = re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M)
    if not codename or codename.group(1) != "bookworm":
        raise HostSetupError(
            "the VM harness installs QEMU >= 10 from bookworm-backports and supports only "
            f"Debian 12 hosts (this is {codename.group(1) if codename else 'unknown'}); "
            f"install {', '.join(QEMU_PACKAGES)} (QEMU >= 10), kmod, zstd, xz-utils yourself"
        )
    log.info("adding %s to %s", BACKPORTS, BACKPORTS_SOURCE)
    text = (
        f"# Added by ixyd tests/vm/harness.py: QEMU >= 10 for the VFIO guest tests.\n"
        f"Types: deb\nURIs: {_debian_mirror()}\nSuites: {BACKPORTS}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    _run(_as_root(["tee", str(BACKPORTS_SOURCE)]), input=text.encode())


def _backports_lists_present() -> bool:
    return any(Path("/var/lib/apt/lists").glob(f"*_dists_{BACKPORTS}_*Packages*"))


def _install_host_packages() -> None:
    installed = _installed_versions([*QEMU_PACKAGES, *TOOL_PACKAGES])
    qemu_ok = all(p in installed for p in QEMU_PACKAGES) and _version_at_least(
        installed["qemu-system-x86"], QEMU_MIN_VERSION
    )
    missing = [] if qemu_ok else [f"{p}/{BACKPORTS}" for p in QEMU_PACKAGES]
    missing += [p for p in TOOL_PACKAGES if p not in installed]
    if not _has_backports_source():
        _add_backports_source()
    if not _backports_lists_present() or missing:
        log.info("apt-get update")
        _apt_get("update")
    if missing:
        log.info("installing %s", " ".join(missing))
        _apt_get("install", "--no-install-recommends", *missing)
    if not QBOOT.is_file():
        raise HostSetupError(f"{QBOOT} missing after installing qemu-system-data")


# --- guest kernel ----------------------------------------------------------------------


def _kernel_package_from(suite: str) -> str | None:
    """linux-image-<version> that linux-image-amd64 from `suite` depends on, per the
    local apt lists; None when the suite does not offer it."""
    stanza = _run(["apt-cache", "show", f"linux-image-amd64/{suite}"])
    depends = re.search(r"^Depends:\s*(linux-image-\S+)", stanza, re.M)
    return depends.group(1).removesuffix("-unsigned") if depends else None


def _kernel_candidates() -> Iterator[str]:
    """Kernel packages to try, best first: IXYD_VM_KERNEL, else bookworm-backports (6.12),
    then bookworm-security (6.1). Looked up lazily: each lookup takes about 0.4 s."""
    if os.environ.get("IXYD_VM_KERNEL"):
        yield "linux-image-" + os.environ["IXYD_VM_KERNEL"].removeprefix("linux-image-")
        return
    for suite in (BACKPORTS, "bookworm-security"):
        package = _kernel_package_from(suite)
        if package:
            yield package


def _prepare_kernel(cache: Path) -> tuple[str, str]:
    """Downloads, unpacks and depmods the chosen kernel unless cached; returns
    (package, kernel version)."""
    errors = []
    for attempt in range(2):
        for package in _kernel_candidates():
            version = package.removeprefix("linux-image-")
            try:
                _unpack_kernel(cache, package, version)
            except HostSetupError as e:
                errors.append(f"{package}: {e}")
                log.warning("kernel %s not usable: %s", package, e)
                continue
            return package, version
        if attempt == 0:  # the local lists may name a version the mirror no longer has
            log.info("apt-get update, then trying the kernels again")
            _apt_get("update")
    raise HostSetupError("no guest kernel could be prepared:\n" + "\n".join(errors))


def _unpack_kernel(cache: Path, package: str, version: str) -> None:
    kroot = cache / "kernels" / version
    done = kroot / ".complete"
    if done.exists():
        return
    deb = _download(cache, package)
    log.info("unpacking %s", deb.name)
    shutil.rmtree(kroot, ignore_errors=True)
    kroot.mkdir(parents=True)
    _unpack_deb(deb, kroot)
    _run(["depmod", "-b", str(kroot), version])
    _extract_vmlinux(kroot / "boot" / f"vmlinuz-{version}", kroot / "boot" / f"vmlinux-{version}")
    done.touch()


def _download(cache: Path, package: str) -> Path:
    """apt-get download into cache/debs (once); returns the .deb."""
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        log.info("downloading %s", package)
        # As root apt-get warns that it cannot drop to _apt for the download: harmless.
        _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise HostSetupError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def _unpack_deb(deb: Path, target: Path) -> None:
    """dpkg-deb -x; a .deb that does not unpack (an interrupted download) is deleted so
    that the next run downloads it again."""
    try:
        _run(["dpkg-deb", "-x", str(deb), str(target)])
    except HostSetupError:
        deb.unlink()
        raise


def _extract_vmlinux(vmlinuz: Path, vmlinux: Path) -> None:
    """Decompresses the kernel payload of a bzImage into an ELF vmlinux (#guest-kernel).

    The decompressors exit non-zero because of the data after the payload; the output is
    still complete, so it is judged by its ELF magic, not by the exit code.
    """
    image = vmlinuz.read_bytes()
    for magic in KERNEL_PAYLOAD_MAGICS:
        offset = image.find(magic)
        while offset >= 0:
            tool = ["zstd", "-dcq"] if magic.startswith(b"\x28") else ["xz", "-dcq"]
            with open(vmlinux, "wb") as out:
                subprocess.run(tool, input=image[offset:], stdout=out, stderr=subprocess.DEVNULL)
            with open(vmlinux, "rb") as check:
                if check.read(4) == b"\x7fELF":
                    return
            offset = image.find(magic, offset + 1)
    vmlinux.unlink(missing_ok=True)
    raise HostSetupError(f"no zstd or xz payload that decompresses to an ELF in {vmlinuz}")


def _prune_unused(cache: Path, kroot: Path, initramfs: Path) -> None:
    """Marks the kernel and initramfs in use and removes the others once unused for
    UNUSED_FOR_S: a session running on the machine may still boot the older ones."""
    in_use = (kroot / ".complete", initramfs)
    for path in in_use:
        path.touch()
    too_old = time.time() - UNUSED_FOR_S
    for other in (cache / "kernels").iterdir():
        stamp = other / ".complete"
        if other != kroot and (stamp.stat().st_mtime if stamp.exists() else 0) < too_old:
            log.info("removing unused kernel %s", other.name)
            shutil.rmtree(other)
            for deb in (cache / "debs").glob(f"linux-image-{other.name}_*.deb"):
                deb.unlink()
    for other in cache.glob("initramfs-*.cpio.gz"):
        if other != initramfs and other.stat().st_mtime < too_old:
            log.info("removing unused %s", other.name)
            other.unlink()


# --- busybox and initramfs -------------------------------------------------------------


def _prepare_busybox(cache: Path) -> Path:
    """Unpacks busybox-static (once); returns the busybox binary."""
    bbroot = cache / "busybox"
    busybox = bbroot / "bin" / "busybox"
    if not (bbroot / ".complete").exists():
        deb = _download(cache, "busybox-static")
        shutil.rmtree(bbroot, ignore_errors=True)
        bbroot.mkdir()
        _unpack_deb(deb, bbroot)
        if not busybox.is_file():
            raise HostSetupError(f"{deb.name} has no bin/busybox")
        (bbroot / ".complete").write_text(deb.name + "\n")
    return busybox


def _module_load_order(kroot: Path, version: str, targets: Sequence[str]) -> list[Path]:
    """Module files (relative to lib/modules/<version>) to insmod for `targets`,
    dependencies first, from modules.dep. Targets built into the kernel are skipped."""
    moddir = kroot / "lib" / "modules" / version

    def name_of(path: str) -> str:
        return re.sub(r"\.ko(\.\w+)?$", "", Path(path).name).replace("-", "_")

    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        paths[name_of(module)] = module
        deps[name_of(module)] = [name_of(n) for n in needs.split()]
    builtin = {name_of(line) for line in (moddir / "modules.builtin").read_text().split()}

    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for target in targets:
        name = target.replace("-", "_")
        if name in deps:
            visit(name)
        elif name not in builtin:
            raise HostSetupError(
                f"module {target} is neither in modules.dep nor built into {version}"
            )
    return [Path(paths[name]) for name in order]


def _prepare_initramfs(cache: Path, kroot: Path, version: str, busybox: Path) -> Path:
    """Builds initramfs-<version>-<hash>.cpio.gz unless one for the same inputs exists."""
    modules = _module_load_order(kroot, version, INITRAMFS_MODULE_TARGETS)
    inputs = hashlib.sha256()
    for part in (
        version,
        INITRAMFS_INIT,
        " ".join(map(str, modules)),
        " ".join(BUSYBOX_APPLETS),
        (busybox.parents[1] / ".complete").read_text(),
    ):
        inputs.update(part.encode() + b"\0")
    image = cache / f"initramfs-{version}-{inputs.hexdigest()[:12]}.cpio.gz"
    if image.exists():
        return image
    log.info("building %s (modules: %s)", image.name, " ".join(m.name for m in modules))
    with tempfile.TemporaryDirectory(dir=cache) as staging_dir:
        staging = Path(staging_dir)
        for sub in ("bin", "dev", "proc", "sys", "newroot", "lower", "upper", "lib/modules"):
            (staging / sub).mkdir(parents=True)
        shutil.copy2(busybox, staging / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (staging / "bin" / applet).symlink_to("busybox")
        names = []
        for module in modules:
            name = re.sub(r"\.ko(\.\w+)?$", "", module.name)
            _decompress_module(
                kroot / "lib" / "modules" / version / module,
                staging / "lib" / "modules" / f"{name}.ko",
            )
            names.append(name)
        (staging / "lib" / "modules" / "order").write_text("\n".join(names) + "\n")
        (staging / "init").write_text(INITRAMFS_INIT)
        (staging / "init").chmod(0o755)
        partial = image.with_suffix(".partial")
        bb = shlex.quote(str(busybox))
        _run(
            [
                "sh",
                "-c",
                f"find . | LC_ALL=C sort | {bb} cpio -o -H newc | gzip -1 > "
                f"{shlex.quote(str(partial))}",
            ],
            cwd=staging,
        )
        partial.rename(image)
    return image


def _decompress_module(source: Path, target: Path) -> None:
    """Copies a kernel module, decompressing .ko.xz/.ko.zst/.ko.gz: busybox insmod wants .ko."""
    if source.suffix == ".xz":
        target.write_bytes(lzma.decompress(source.read_bytes()))
    elif source.suffix == ".zst":
        target.write_bytes(
            subprocess.run(["zstd", "-dcq", str(source)], check=True, capture_output=True).stdout
        )
    elif source.suffix == ".gz":
        import gzip

        target.write_bytes(gzip.decompress(source.read_bytes()))
    else:
        shutil.copyfile(source, target)


# ---------------------------------------------------------------------------------------
# Running a guest


def qemu_command(
    host: VmHost, share: Path, kernel_args: Sequence[str], topology: str = "default"
) -> list[str]:
    """The QEMU command line of #qemu-command-line, with `share` as the guest's writable `out` tag.
    Keep the order of the devices: it decides the guest's PCI addresses (IGB_PORTS, or
    IGB_PORTS_SHARED_GROUP for topology="shared-group")."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    options = [
        "-accel tcg,thread=multi,tb-size=256 -cpu max",  # KVM here is kvm_pvm: unusable
        "-machine q35,kernel-irqchip=split -m 1024 -smp 2",
        "-device intel-iommu,intremap=on,caching-mode=on",  # DMA + interrupt remapping
        "-nographic -serial mon:stdio -nic none -no-reboot",  # panic=-1 + -no-reboot: exit
        f"-bios {QBOOT} -kernel {host.vmlinux} -initrd {host.initramfs}",
        "-virtfs local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
        f"-virtfs local,path={share},mount_tag=out,security_model=none",
        "-netdev hubport,id=p0,hubid=0 -netdev hubport,id=p1,hubid=0",  # the wire between
    ]
    if topology == "default":
        options += [
            "-device pcie-root-port,id=rp1,chassis=1,slot=1",  # one igb per root port: own
            "-device pcie-root-port,id=rp2,chassis=2,slot=2",  # IOMMU group, no igbvf clash
            *(
                f"-device igb,bus={port.root_port},netdev=p{i},mac={port.mac},romfile="
                for i, port in enumerate(IGB_PORTS)
            ),
        ]
    else:  # shared-group: both igb behind one PCIe-to-PCI bridge, one IOMMU group
        options += [
            "-device pcie-root-port,id=rp1,chassis=1,slot=1",
            f"-device pcie-pci-bridge,id={SHARED_GROUP_BRIDGE},bus=rp1",
            *(
                f"-device igb,bus={SHARED_GROUP_BRIDGE},addr={slot:#x},netdev=p{i},"
                f"mac={port.mac},romfile="
                for i, (port, slot) in enumerate(
                    zip(IGB_PORTS_SHARED_GROUP, SHARED_GROUP_SLOTS, strict=True)
                )
            ),
        ]
    return [QEMU, *" ".join(options).split(), "-append", " ".join(kernel_args)]


def run_in_guest(
    command: Sequence[str] | str,
    *,
    timeout: float = 90,
    with_igb_driver: bool = False,
    env: Mapping[str, str] | None = None,
    host: VmHost | None = None,
    topology: str = "default",
    init: str = "script",
    hugepages: int = GUEST_HUGEPAGES,
) -> GuestResult:
    """Boots the guest, runs `command` as root in the repo root and powers off.

    command: an argv list, or a string run by bash (may be a multi-line script).
    timeout: seconds for the whole run, boot included (a boot takes 4-5 s on an idle
        host, up to 30 s with other guests on the two cores). The guest stops the command
        GUEST_WIND_DOWN_S (systemd: GUEST_WIND_DOWN_SYSTEMD_S) before that and reports what
        it printed; the host kills QEMU
        at the timeout. Either way: GuestTimeout.
    with_igb_driver: also load the kernel's igb driver, which then binds both ports
        (otherwise no driver is bound and only vfio-pci and vfio_iommu_type1 are loaded).
    env: extra environment; the command starts from a clean one: PATH (the directory of
        GUEST_PYTHON first), HOME=/root, LANG=C.UTF-8, IXYD_VM_GUEST=1; no PYTHONPATH
        unless given here.
    topology: "default" (IGB_PORTS: each igb alone in its IOMMU group) or "shared-group"
        (IGB_PORTS_SHARED_GROUP: both igb in one IOMMU group, behind a pcie-pci-bridge).
    init: "script" (guest_init.sh is PID 1 and runs the command; read-only root) or
        "systemd" (the host's systemd is PID 1 on a writable overlay root and runs the
        command as a unit after basic.target; see guest_systemd.sh). Same command
        environment and results; with systemd also `journal` and `boot`.
    hugepages: 2 MiB hugepages the guest reserves at boot (GUEST_HUGEPAGES); 0 leaves
        DMA memory in 4 KiB pages, where QEMU's igb loses page-crossing TX frames.
    Raises GuestTimeout, GuestError (no result: panic, init failure), HostSetupError.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; one of {', '.join(INITS)}")
    if hugepages < 0:
        raise ValueError(f"hugepages must be 0 or more, got {hugepages}")
    host = host or ensure_host()
    with tempfile.TemporaryDirectory(prefix="ixyd-vm-") as run_dir:
        share = Path(run_dir) / "out"
        share.mkdir()
        for path in (share, GUEST_INIT, GUEST_SYSTEMD, REPO_ROOT, host.cache_dir):
            if re.search(r"\s", str(path)):
                raise GuestError(f"{path}: the kernel command line cannot carry whitespace")
        script = command if isinstance(command, str) else shlex.join(command)
        (share / "command.sh").write_text(script + "\n")
        wind_down = GUEST_WIND_DOWN_S if init == "script" else GUEST_WIND_DOWN_SYSTEMD_S
        (share / "config").write_text(
            _guest_config(host, timeout - wind_down, with_igb_driver, env or {})
        )
        # no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can
        # miss its ticks and panic ("IO-APIC + timer doesn't work!"); seen once here.
        kernel_args = [
            "console=ttyS0",
            "panic=-1",
            "intel_iommu=on",
            "no_timer_check",
            *([f"hugepages={hugepages}"] if hugepages else []),
            *(
                [f"rootinit={GUEST_INIT}"]
                if init == "script"
                else ["rootoverlay", f"rootinit={GUEST_SYSTEMD}"]
            ),
            f"ixydvm_out={share}",
        ]
        console_path = Path(run_dir) / "console.log"
        started = time.monotonic()
        with open(console_path, "wb") as console_file:
            qemu = subprocess.Popen(
                qemu_command(host, share, kernel_args, topology),
                stdin=subprocess.DEVNULL,
                stdout=console_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                qemu.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(qemu)
                raise GuestTimeout(
                    f"guest did not finish within {timeout:g} s; QEMU killed. Console tail:\n"
                    + _tail(console_path.read_text(errors="replace")),
                    console=console_path.read_text(errors="replace"),
                ) from None
            finally:
                _kill(qemu)
        elapsed = time.monotonic() - started
        console = console_path.read_text(errors="replace")
        return _collect(share, console, elapsed, qemu.returncode, timeout)


def _guest_config(
    host: VmHost, deadline: float, with_igb_driver: bool, env: Mapping[str, str]
) -> str:
    """The bash assignments guest_init.sh (or guest_systemd.sh) sources from the share.
    deadline: guest uptime (s) at which the command is stopped."""
    guest_env = {
        "PATH": f"{Path(GUEST_PYTHON).parent}:{GUEST_SYSTEM_PATH}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",  # the root is read-only
        "IXYD_VM_GUEST": "1",
        **env,
    }
    settings = {
        "KROOT": str(host.kroot),
        "MODULES": "vfio-pci vfio_iommu_type1" + (" igb" if with_igb_driver else ""),
        "WORKDIR": str(REPO_ROOT),
        "DEADLINE": f"{max(1.0, deadline):.1f}",  # guest uptime, s
    }
    lines = [f"{key}={shlex.quote(value)}" for key, value in settings.items()]
    lines.append(
        "GUEST_ENV=(" + " ".join(shlex.quote(f"{k}={v}") for k, v in guest_env.items()) + ")"
    )
    return "\n".join(lines) + "\n"


def _collect(
    share: Path, console: str, elapsed: float, qemu_rc: int, timeout: float
) -> GuestResult:
    def read(name: str) -> str | None:
        path = share / name
        return path.read_text(errors="replace") if path.exists() else None

    output = read("output")
    if read("timedout") is not None:
        raise GuestTimeout(
            f"command did not finish within the guest's deadline ({timeout:g} s run timeout); "
            f"output tail:\n{_tail(output or '')}",
            console=console,
            output=output,
        )
    rc = read("rc")
    boot = read("boot")
    if rc is None or not rc.strip().lstrip("-").isdigit():
        setup = read("setup-error")
        panic = re.search(r"Kernel panic - not syncing: [^\n]*", console)
        reason = (
            f"guest setup failed: {setup.strip()}"
            if setup
            else f"guest kernel panic: {panic.group(0)}"
            if panic
            else "no result from the guest"
        )
        raise GuestError(
            f"{reason} (QEMU exit {qemu_rc}); console tail:\n{_tail(console)}",
            console=console,
            output=output,
        )
    return GuestResult(
        returncode=int(rc),
        output=output or "",
        console=console,
        dmesg=read("dmesg") or "",
        elapsed=elapsed,
        boot=float(boot) if boot and re.fullmatch(r"\d+(\.\d+)?", boot.strip()) else None,
        journal=read("journal") or "",
    )


def _kill(process: subprocess.Popen) -> None:
    """Kills QEMU's whole process group (it was started in a new session) and reaps it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run one command (e.g. a scenario) in the guest, print its output, exit with its code."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--igb", action="store_true", help="load the kernel's igb driver too")
    parser.add_argument("--timeout", type=float, default=90, help="seconds for the whole run")
    parser.add_argument("--console", action="store_true", help="print the serial console too")
    parser.add_argument("--dmesg", action="store_true", help="print the guest's dmesg too")
    parser.add_argument("--topology", choices=TOPOLOGIES, default="default", help="PCI layout")
    parser.add_argument("--init", choices=INITS, default="script", help="PID 1 of the guest")
    parser.add_argument("--journal", action="store_true", help="print the journal (systemd)")
    parser.add_argument(
        "--hugepages", type=int, default=GUEST_HUGEPAGES, help="2 MiB pages the guest reserves"
    )
    parser.add_argument("command", nargs="+", help="argv to run (a single word: a bash script)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ixyd-vm: %(message)s")
    command = args.command[0] if len(args.command) == 1 else args.command
    try:
        host = ensure_host()
        result = run_in_guest(
            command,
            timeout=args.timeout,
            with_igb_driver=args.igb,
            host=host,
            topology=args.topology,
            init=args.init,
            hugepages=args.hugepages,
        )
    except GuestError as e:
        if args.console:
            print(e.console)
        print(f"ixyd-vm: {e}", file=sys.stderr)
        return 125
    if args.console:
        print(result.console)
    if args.dmesg:
        print(result.dmesg)
    if args.journal:
        print(result.journal)
    sys.stdout.write(result.output)
    print(
        f"ixyd-vm: {host.kernel_version}, exit {result.returncode}, {result.elapsed:.1f} s"
        + (f" (command started at guest uptime {result.boot:.1f} s)" if result.boot else ""),
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
