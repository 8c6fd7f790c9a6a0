"""Boot ixyd's systemd units in a real systemd (Debian 12, systemd 252) with systemd-nspawn.

    root = ensure_base_root()        debootstrap bookworm + /opt/ixyd venv with ixyd's
                                     dependencies, cached in /var/cache/ixyd-nspawn/<key>
    with Container.boot(root) as c:  an overlay on the cached root with this checkout's
        c.run(["systemctl", ...])    ixyd wheel installed, booted with `systemd-nspawn -b`;
                                     commands run inside through nsenter(1)

The cache key is a hash of the suite, the package list and ixyd's dependencies, so a
change to any of them builds a new root (about a minute, mostly debootstrap). Each boot
writes only to a fresh overlay upper directory, which is thrown away afterwards.

The host has no system bus, so the container is started with `--register=no
--keep-unit` (no machined) and driven with nsenter into its namespaces instead of
`machinectl shell` / `systemd-run -M`
(docs/reference/systemd.md#nspawn-on-machines-without-a-system-bus).

Run by hand from the repo root (boots, runs the command inside, powers off):
    .venv/bin/python tests/nspawn/nspawn_harness.py -- systemctl status
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("ixyd.nspawn")

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IXYD_NSPAWN_CACHE", "/var/cache/ixyd-nspawn"))
SCRATCH = Path("/var/tmp")  # overlay upper dirs: a disk file system (not tmpfs, not overlay)
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1, Debian's python3 for the venv, iproute2/procps for the tests' checks
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2", "procps")
VENV = "/opt/ixyd"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
DEBOOTSTRAP_TIMEOUT = 900  # seconds; 46-65 s observed on the build machines
BOOT_TIMEOUT = 60  # seconds for `systemctl is-system-running --wait`; ~3 s observed
POWEROFF_TIMEOUT = 30


# ---------------------------------------------------------------------------- the tests' instance
INSTANCE = "0000:03:00.0"
SERVICE = f"ixyd@{INSTANCE}.service"
SOCKET = f"ixyd@{INSTANCE}.socket"
METRICS = "127.0.0.1:19911"

# The instance named after a PCI address, configured for two ports of the built-in 82599
# model (no NIC, no /dev/vfio): small rings and pools, so that everything fits the 8 MiB
# memlock limit the build machines impose (LimitMEMLOCK=infinity is clamped in nspawn).
INSTANCE_CONFIG = f"""\
metrics = "{METRICS}"
fault_injection = true  # the watchdog and removal tests use inject_fault

[[port]]
address = "card.0"
rx_ring = 64
tx_ring = 64
pool_size = 256
forward = {{mode = "port", to = "card.1"}}

[[port]]
address = "card.1"
rx_ring = 64
tx_ring = 64
pool_size = 256
forward = {{mode = "port", to = "card.0"}}

[model_traffic]
rate = 2000
"""

# Test-only drop-in: a short watchdog so the hang test takes seconds, not the unit's 10 s,
# and a start limit that cannot end the session early.
TEST_DROP_IN = """\
[Unit]
StartLimitBurst=50
[Service]
WatchdogSec=3s
RestartSec=1s
"""


class NspawnError(RuntimeError):
    """The container could not be built, booted or driven; the message says why."""


def _run(command: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise NspawnError(
            f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done


def dependencies() -> list[str]:
    """ixyd's runtime requirements, from pyproject.toml."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def cache_key() -> str:
    text = "\n".join([SUITE, MIRROR, *PACKAGES, VENV, *dependencies(), sys.version.split()[0]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        yield


def _chroot(root: Path, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run(["chroot", str(root), *command], timeout, env=CLEAN_ENV)


def build_wheels(out: Path, *requirements: str, no_deps: bool = False) -> list[Path]:
    """Wheels built on this host (same Debian, same CPython 3.11 ABI as the root's)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    _run([*command, *(["--no-deps"] if no_deps else []), "-w", str(out), *requirements], 600)
    return sorted(out.glob("*.whl"))


def ensure_base_root() -> Path:
    """The cached root: debootstrap of PACKAGES plus a venv at VENV with ixyd's
    dependencies (not ixyd itself). Built once per cache key."""
    missing = missing_tools()
    if missing:
        raise NspawnError(
            f"missing {', '.join(missing)}: apt-get install debootstrap systemd-container "
            "(scripts/bootstrap does)"
        )
    key = cache_key()
    root = CACHE / key / "rootfs"
    with _locked(CACHE / ".lock"):
        if (root / ".ixyd-base-complete").exists():
            return root
        building = CACHE / f"{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        started = time.monotonic()
        log.info("building the nspawn root in %s (debootstrap %s)", building, SUITE)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(building / "rootfs"),
                MIRROR,
            ],
            DEBOOTSTRAP_TIMEOUT,
        )
        wheels = building / "rootfs" / "tmp" / "wheels"
        build_wheels(wheels, *dependencies())
        _chroot(building / "rootfs", "python3", "-m", "venv", VENV)
        _chroot(
            building / "rootfs",
            f"{VENV}/bin/pip",
            "install",
            "-q",
            "--no-index",
            "--find-links=/tmp/wheels",
            *dependencies(),
        )
        shutil.rmtree(wheels)
        (building / "rootfs" / ".ixyd-base-complete").touch()
        shutil.rmtree(CACHE / key, ignore_errors=True)
        os.rename(building, CACHE / key)
        log.info("nspawn root ready after %.0f s", time.monotonic() - started)
    return root


def build_ixyd_wheel(out: Path) -> Path:
    """This checkout as a wheel (compiles the cffi modules; about 6 s)."""
    wheels = build_wheels(out, str(REPO_ROOT), no_deps=True)
    found = [w for w in wheels if w.name.startswith("ixyd-")]
    if len(found) != 1:
        raise NspawnError(f"pip wheel made {wheels}, expected one ixyd wheel")
    return found[0]


class Container:
    """A booted container: an overlay over the cached root, with ixyd installed in VENV."""

    def __init__(self, base: Path, scratch: Path):
        self.base = base
        self.scratch = scratch
        self.root = scratch / "merged"
        self.process: subprocess.Popen | None = None
        self.leader: int | None = None  # the container's PID 1, as the host sees it
        self.console = scratch / "console.log"

    # ---------------------------------------------------------------- life cycle
    @classmethod
    @contextlib.contextmanager
    def boot(cls, base: Path, prepare=None) -> Iterator[Container]:
        """Overlay, install this checkout, call prepare(container) before booting (write
        files into container.root), boot, yield; then power off and clean up."""
        scratch = Path(tempfile.mkdtemp(prefix="ixyd-nspawn-", dir=SCRATCH))
        container = cls(base, scratch)
        try:
            container._mount()
            container._install_ixyd()
            if prepare is not None:
                prepare(container)
            container._start()
            yield container
        finally:
            container._poweroff()
            container._unmount()
            shutil.rmtree(scratch, ignore_errors=True)

    def _mount(self) -> None:
        for name in ("upper", "work", "merged"):
            (self.scratch / name).mkdir()
        upper, work = self.scratch / "upper", self.scratch / "work"
        options = f"lowerdir={self.base},upperdir={upper},workdir={work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], 30)

    def _unmount(self) -> None:
        if os.path.ismount(self.root):
            subprocess.run(["umount", str(self.root)], capture_output=True, check=False)

    def _install_ixyd(self) -> None:
        wheel = build_ixyd_wheel(self.scratch / "wheel")
        shutil.copy(wheel, self.root / "tmp" / wheel.name)
        _chroot(
            self.root,
            f"{VENV}/bin/pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--force-reinstall",
            f"/tmp/{wheel.name}",
        )
        os.unlink(self.root / "tmp" / wheel.name)

    def _start(self) -> None:
        console = open(self.console, "w")
        self.process = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={self.root}",
                "--boot",
                "--register=no",  # no system bus on the host: no machined
                "--keep-unit",
                "--private-network",  # loopback only: the metrics port stays inside
                "--console=pipe",
                f"--machine=ixyd-test-{os.getpid()}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.leader is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise NspawnError(f"the container did not start:\n{self.console.read_text()}")
            self.leader = _child_named(self.process.pid, "systemd")
            time.sleep(0.05)
        while True:  # the first nsenter may come before systemd set up its bus socket
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT
            )
            if state.stdout.strip() in ("running", "degraded"):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise NspawnError(
                    f"the container's systemd is {state.stdout.strip()!r} ({state.stderr.strip()}):"
                    f"\n{self.run(['systemctl', '--failed', '--no-pager'], check=False).stdout}"
                    f"\nconsole:\n{self.console.read_text()}"
                )
            time.sleep(0.1)

    def _poweroff(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # nspawn forwards SIGTERM to the container's systemd as SIGRTMIN+3: a clean poweroff
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    # ---------------------------------------------------------------- driving
    def run(
        self, command: Sequence[str], *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        """Run a command inside the container as root (all its namespaces, clean env)."""
        env = [f"{k}={v}" for k, v in CLEAN_ENV.items()]
        full = ["nsenter", f"--target={self.leader}", "--all", "env", "-i", *env, *command]
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NspawnError(
                f"`{' '.join(command)}` failed in the container (exit {done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def wait_for(self, predicate, what: str, timeout: float = 30.0, interval: float = 0.2):
        """Poll predicate() until it returns something true; NspawnError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise NspawnError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)


def _child_named(parent: int, comm: str) -> int | None:
    """A descendant of `parent` whose command name is `comm` (nspawn forks once or twice)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append((int(entry), name))
    todo = [parent]
    while todo:
        for pid, name in children.get(todo.pop(), []):
            if name == comm:
                return pid
            todo.append(pid)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Container.boot(ensure_base_root()) as container:
        done = container.run(args.command, check=False, timeout=300)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
