"""The systemd units and `ixyd-host` (install, verify, prepare, release), without booting systemd.

- `ixyd-host install --root` writes the units, sysusers.d, tmpfiles.d and the udev rule
  into a scratch root and applies them offline (systemd-sysusers/-tmpfiles --root).
- `systemd-analyze verify` on the installed template under an instance name with colons
  (docs/reference/systemd.md#verifying-units-without-booting: FILE:ALIAS, --man=no, and
  any stderr is a failure since parse errors only warn), and `systemd-analyze security
  --offline=yes` with an exposure of at most 3.0.
- `ixyd-host prepare` / `release` against a fake sysfs (hosttools.FakeKernel): the
  privileged ExecStartPre=+ binds to vfio-pci and hands /dev/vfio/<group> to the daemon's
  group; the daemon's own bind_vfio on the bound device then only checks; release gives it
  back; an instance of model ports is a no-op.
The same units under a running systemd: tests/nspawn/.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hosttools import FakeKernel, bind, make_device

import ixyd.config
import ixyd.host
import ixyd.pci
from ixyd.host import HostError, install, prepare, release_instance
from ixyd.pci import bind_vfio

INSTANCE = "0000:03:00.0"
BIN_DIR = "/opt/ixyd/bin"
PYTHON = f"{BIN_DIR}/python3"
MAX_EXPOSURE = 3.0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory):
    """A scratch root with the installed units, what verify needs to resolve them (the
    distribution's units for sysinit.target and friends) and stand-ins for the executables
    the units name."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    (root / BIN_DIR.lstrip("/")).mkdir(parents=True)
    for program in ("ixyd", "ixyd-host", "ixyd-ctl", "python3"):
        path = root / BIN_DIR.lstrip("/") / program
        path.write_text(f"#!{PYTHON}\nexit 0\n" if program != "python3" else "#!/bin/sh\n")
        path.chmod(0o755)
    return root


def analyze(root, *args: str) -> subprocess.CompletedProcess:
    units = root / "etc/systemd/system"
    return subprocess.run(
        [
            "systemd-analyze",
            *args,
            f"--root={root}",
            f"{units}/ixyd@.service:ixyd@{INSTANCE}.service",
            *(
                [
                    f"{units}/ixyd@.socket:ixyd@{INSTANCE}.socket",
                    f"{units}/ixyd-metrics@.socket:ixyd-metrics@{INSTANCE}.socket",
                ]
                if args[0] == "verify"
                else []
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def exposure(root) -> float:
    done = analyze(root, "security", "--offline=yes", "--no-pager")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1))


@needs_root
def test_install_writes_the_units_with_the_bin_dir_and_creates_the_accounts(unit_root):
    done = install(str(unit_root), bin_dir=BIN_DIR)
    units = unit_root / "etc/systemd/system"
    service = (units / "ixyd@.service").read_text()
    assert "@BINDIR@" not in service
    assert f"ExecStart={BIN_DIR}/ixyd -- %i" in service
    # root's lines: isolated from the daemon user's HOME and site-packages
    assert f"ExecStartPre=+{PYTHON} -I -m ixyd.host prepare --group ixyd -- %i" in service
    assert f"ExecStopPost=+{PYTHON} -I -m ixyd.host release --if-stopped-cleanly -- %i" in service
    assert (unit_root / "etc/udev/rules.d/70-ixyd-vfio.rules").exists()
    assert ("systemd-sysusers", f"--root={unit_root}", "ixyd.conf") in done.commands
    passwd = (unit_root / "etc/passwd").read_text()
    group = (unit_root / "etc/group").read_text()
    assert re.search(r"^ixyd:x:\d+:\d+:.*:/var/lib/ixyd:/usr/sbin/nologin$", passwd, re.M)
    assert re.search(r"^ixyd-ops:x:\d+:$", group, re.M)
    state = (unit_root / "var/lib/ixyd").stat()
    assert stat.S_IMODE(state.st_mode) == 0o750
    assert (unit_root / "run/ixyd/vfio").is_dir()


@needs_root
def test_install_puts_the_metrics_generator_where_systemd_runs_it(unit_root, tmp_path):
    """The generator (ixyd/generator.py) is installed executable, runs isolated (-I) with
    the interpreter the units' root lines use, and writes into the directory systemd
    gives it."""
    install(str(unit_root), bin_dir=BIN_DIR, apply=False)
    generator = unit_root / "etc/systemd/system-generators/ixyd-metrics-generator"
    assert stat.S_IMODE(generator.stat().st_mode) == 0o755
    python = generator.read_text().splitlines()[0]
    assert python == f"#!{PYTHON} -I"  # ixyd-host's interpreter, as in the units
    done = subprocess.run(  # the stand-in python3 is a shell script: run it with this one
        [sys.executable, "-I", str(generator), str(tmp_path / "normal"), str(tmp_path / "early"), str(tmp_path / "late")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (unit_root / "etc/systemd/system/ixyd-metrics@.socket").exists()


@needs_root
def test_systemd_analyze_verify_accepts_the_template_under_a_pci_address(unit_root):
    install(str(unit_root), bin_dir=BIN_DIR, apply=False)
    done = analyze(unit_root, "verify", "--man=no")
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done


@needs_root
def test_systemd_analyze_verify_catches_a_bad_setting(unit_root, tmp_path):
    """The check above can fail: a typo that systemd only warns about fails it."""
    install(str(unit_root), bin_dir=BIN_DIR, apply=False)
    service = unit_root / "etc/systemd/system/ixyd@.service"
    good = service.read_text()
    try:
        service.write_text(good.replace("WatchdogSec=10s", "WatchdogSec=banana"))
        done = analyze(unit_root, "verify", "--man=no")
        assert done.returncode == 0  # a parse error is only a warning...
        assert "banana" in done.stderr  # ...on stderr, which the verify test rejects
    finally:
        service.write_text(good)


@needs_root
def test_exposure_score_is_at_most_3(unit_root):
    install(str(unit_root), bin_dir=BIN_DIR, apply=False)
    assert exposure(unit_root) <= MAX_EXPOSURE


@needs_root
def test_tap_drop_in_verifies_and_keeps_the_score_at_most_3(unit_root):
    try:
        install(str(unit_root), bin_dir=BIN_DIR, tap=True, apply=False)
        drop_in = unit_root / "etc/systemd/system/ixyd@.service.d/50-tap.conf"
        assert "CAP_NET_ADMIN" in drop_in.read_text()
        done = analyze(unit_root, "verify", "--man=no")
        assert done.returncode == 0 and done.stderr == "", done
        tap_score = exposure(unit_root)
        assert tap_score <= MAX_EXPOSURE
    finally:
        install(str(unit_root), bin_dir=BIN_DIR, apply=False)  # without --tap: removed
    assert not drop_in.exists()
    assert exposure(unit_root) < tap_score


def test_install_refuses_a_bin_dir_without_ixyd(tmp_path):
    with pytest.raises(HostError, match="not an executable"):
        install(str(tmp_path), bin_dir="/nowhere/bin", apply=False)


def scripts(root, bin_dir: str, interpreter: str) -> None:
    where = root / bin_dir.lstrip("/")
    where.mkdir(parents=True, exist_ok=True)
    for program in ("ixyd", "ixyd-host"):
        (where / program).write_text(f"#!{interpreter}\nimport sys\n")
        (where / program).chmod(0o755)


def test_install_refuses_programs_the_sandboxed_daemon_cannot_see(tmp_path):
    """ProtectHome=yes hides /root, /home and /run/user from the daemon, and it runs as
    user ixyd: a unit that points there fails with 203/EXEC while ExecStartPre=+ (outside
    the sandbox) has already bound the NIC. install refuses, naming the path and why."""
    scripts(tmp_path, "/home/alice/venv/bin", "/home/alice/venv/bin/python3")
    with pytest.raises(HostError, match=r"/home/alice/venv/bin/ixyd is below /home") as e:
        install(str(tmp_path), bin_dir="/home/alice/venv/bin", apply=False)
    assert "/opt/ixyd" in str(e.value)  # and says what to do instead
    assert not (tmp_path / "etc").exists()  # nothing installed

    # a venv outside /root whose python is a link into /root (pyenv): the interpreter
    (tmp_path / "root/.pyenv/bin").mkdir(parents=True)
    (tmp_path / "root/.pyenv/bin/python3.11").write_text("")
    (tmp_path / "opt/ixyd/bin").mkdir(parents=True)
    (tmp_path / "opt/ixyd/bin/python3").symlink_to("/root/.pyenv/bin/python3.11")
    scripts(tmp_path, "/opt/ixyd/bin", "/opt/ixyd/bin/python3")
    with pytest.raises(HostError, match=r"python3 \(that is /root/\.pyenv/bin/python3\.11\)"):
        install(str(tmp_path), bin_dir="/opt/ixyd/bin", apply=False)

    # a directory on the way that others may not enter (a venv made under umask 077)
    scripts(tmp_path, "/srv/private/bin", "/usr/bin/python3")
    (tmp_path / "srv/private").chmod(0o700)
    with pytest.raises(HostError, match="/srv/private .*may not be entered by others"):
        install(str(tmp_path), bin_dir="/srv/private/bin", apply=False)

    scripts(tmp_path, "/srv/shared/bin", "/usr/bin/python3")
    install(str(tmp_path), bin_dir="/srv/shared/bin", apply=False)
    assert (tmp_path / "etc/systemd/system/ixyd@.service").exists()


def test_install_checks_this_installations_python_and_packages():
    """For the running installation the check covers its Python and the packages the daemon
    imports: here (a venv of a Python in /root, the checkout in /work) what it finds is
    exactly what is below /root."""
    problems = ixyd.host.daemon_cannot_run("/", ixyd.host.default_bin_dir())
    below_root = [
        p
        for p in (os.path.realpath(sys.executable), sysconfig.get_path("stdlib"))
        if os.path.realpath(p).startswith(("/root/", "/home/"))
    ]
    assert len(problems) >= len(below_root)
    for path in below_root:
        assert any(os.path.realpath(path) in problem for problem in problems), problems
    if not below_root:
        assert problems == []


# ---------------------------------------------------------------------------- prepare/release
GROUP = 21


@pytest.fixture
def host(tmp_path, monkeypatch):
    """One 82599 port on ixgbe, alone in IOMMU group 21; /etc/ixyd and /dev/vfio in tmp."""
    root = tmp_path / "sys"
    for driver in ("ixgbe", "vfio-pci"):
        d = root / "bus" / "pci" / "drivers" / driver
        d.mkdir(parents=True)
        (d / "unbind").write_text("")
    (root / "bus" / "pci" / "drivers_probe").write_text("")
    make_device(root, INSTANCE, group=GROUP)
    kernel = FakeKernel(str(root), {INSTANCE: "ixgbe"})
    bind(kernel, INSTANCE, "ixgbe")
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    monkeypatch.setattr(ixyd.config, "CONFIG_DIR", str(config_dir))
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / str(GROUP)).write_text("")  # the node vfio-pci makes (here: before the bind)
    os.chmod(dev / str(GROUP), 0o600)
    ixyd.pci._bindings.clear()
    yield kernel, config_dir, dev, tmp_path / "marks"
    ixyd.pci._bindings.clear()


def a_group() -> grp.struct_group:
    return grp.getgrgid(os.getgid())


def test_prepare_binds_to_vfio_pci_and_gives_the_daemon_group_the_node(host):
    kernel, _, dev, marks = host
    group = a_group()
    bindings = prepare(INSTANCE, group.gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert [b.original_driver for b in bindings] == ["ixgbe"]
    assert kernel.driver(INSTANCE) == "vfio-pci"
    override = f"bus/pci/devices/{INSTANCE}/driver_override"
    assert (override, "vfio-pci") in kernel.writes
    node = (dev / str(GROUP)).stat()
    assert node.st_gid == group.gr_gid and stat.S_IMODE(node.st_mode) == 0o660
    mark = json.loads((marks / str(GROUP)).read_text())
    assert mark == {
        "instance": INSTANCE,
        "devices": {INSTANCE: {"driver": "ixgbe", "netdevs": ["ixfake0"]}},
        "give_back": True,
    }

    # the daemon (unprivileged, /sys read-only) finds it bound: a check, no write
    ixyd.pci._bindings.clear()
    writes = len(kernel.writes)
    assert bind_vfio(INSTANCE, sysfs=kernel).original_driver is None
    assert len(kernel.writes) == writes

    # a restart after a failure: still bound, the record of the original driver is kept
    prepare(INSTANCE, group.gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert json.loads((marks / str(GROUP)).read_text()) == mark

    assert release_instance(INSTANCE, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks)) == [
        INSTANCE
    ]
    assert kernel.driver(INSTANCE) == "ixgbe"
    assert not (marks / str(GROUP)).exists()
    node = (dev / str(GROUP)).stat()
    assert node.st_gid == 0 and stat.S_IMODE(node.st_mode) == 0o600


def test_prepare_refuses_a_group_another_instance_holds(host):
    kernel, config_dir, dev, marks = host
    (config_dir / "other.toml").write_text(f'[[port]]\naddress = "{INSTANCE}"\n')
    prepare(INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    with pytest.raises(HostError, match=f"held by ixyd instance '{INSTANCE}'"):
        prepare("other", a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))


def test_prepare_refuses_a_nic_in_use_and_leaves_no_record(host, monkeypatch):
    kernel, _, dev, marks = host

    def in_use(address, ifnames, *, force=False, netns=None):
        raise ixyd.pci.NetdevInUseError(f"{address} is in use by the kernel: ixfake0 is up")

    monkeypatch.setattr(ixyd.pci, "check_netdevs_idle", in_use)
    with pytest.raises(ixyd.pci.NetdevInUseError):
        prepare(INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert kernel.driver(INSTANCE) == "ixgbe" and kernel.writes == []
    assert not (marks / str(GROUP)).exists()


def test_give_back_false_leaves_the_device_on_vfio_pci(host):
    kernel, config_dir, dev, marks = host
    (config_dir / f"{INSTANCE}.toml").write_text(
        f'give_back = false\n[[port]]\naddress = "{INSTANCE}"\n'
    )
    prepare(INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert release_instance(INSTANCE, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks)) == []
    assert kernel.driver(INSTANCE) == "vfio-pci"
    assert not (marks / str(GROUP)).exists()


def test_prepare_of_model_ports_does_nothing(host):
    kernel, config_dir, dev, marks = host
    (config_dir / f"{INSTANCE}.toml").write_text('[[port]]\naddress = "card.0"\n')
    assert prepare(INSTANCE, "no-such-group", sysfs=kernel, mark_dir=str(marks)) == []
    assert kernel.writes == [] and not marks.exists()


def test_prepare_names_a_missing_group(host):
    kernel, _, dev, marks = host
    with pytest.raises(HostError, match="group 'no-such-group' does not exist"):
        prepare(INSTANCE, "no-such-group", sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert kernel.writes == []


@pytest.mark.parametrize(
    "environment, released",
    [
        ({"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"}, True),
        ({"SERVICE_RESULT": "watchdog", "EXIT_CODE": "dumped", "EXIT_STATUS": "ABRT"}, False),
        ({"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}, False),
        ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "1"}, False),
        # the daemon never ran (prepare failed), or systemd could not exec it, or it
        # refused its configuration (no restart follows)
        ({"SERVICE_RESULT": "exit-code"}, True),
        ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "2"}, True),
        ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "203"}, True),
        ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "226"}, True),
    ],
)
def test_release_keeps_the_nic_only_when_a_restart_follows(monkeypatch, environment, released):
    calls = []
    monkeypatch.setattr(
        ixyd.host, "release_instance", lambda instance: calls.append(instance) or []
    )
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert ixyd.host.main(["release", "--if-stopped-cleanly", INSTANCE]) == 0
    assert calls == ([INSTANCE] if released else [])
    assert ixyd.host.main(["release", INSTANCE]) == 0  # by hand: always
    assert calls[-1] == INSTANCE


def test_prepare_reports_a_bad_configuration_with_exit_2(host, caplog):
    _, config_dir, _, _ = host
    (config_dir / f"{INSTANCE}.toml").write_text("[[port]]\naddress = 3\n")
    assert ixyd.host.main(["prepare", INSTANCE]) == 2
    assert "port[0].address is required" in caplog.text


# ---------------------------------------------------------------------------- operational trust
OTHER = "0000:05:00.0"


@pytest.mark.parametrize(
    "vendor, device, cls, driver, words",
    [
        ("0x8086", "0xa102", "0x010601", "ahci", "not a network controller (PCI class 0x010601"),
        ("0x144d", "0xa808", "0x010802", "nvme", "not a network controller (PCI class 0x010802"),
        ("0x8086", "0x1533", "0x020000", "igb", "no ixyd driver for 8086:1533"),  # an i210
    ],
)
def test_prepare_refuses_a_function_no_ixyd_driver_drives_before_any_write(
    host, monkeypatch, caplog, vendor, device, cls, driver, words
):
    """A SATA or NVMe controller (or a NIC ixyd has no driver for) given as the instance
    stays with its driver: a configuration error (exit 2), found before any sysfs write."""
    kernel, _, dev, marks = host
    make_device(Path(kernel.root), OTHER, group=GROUP + 1, vendor=vendor, device=device, cls=cls)
    bind(kernel, OTHER, driver)
    with pytest.raises(ixyd.config.ConfigError, match=re.escape(words)):
        prepare(OTHER, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert kernel.writes == [] and kernel.driver(OTHER) == driver and not marks.exists()
    monkeypatch.setattr(ixyd.host, "Sysfs", lambda: kernel)
    assert ixyd.host.main(["prepare", OTHER]) == 2
    assert words in caplog.text and kernel.writes == []


def test_daemon_refuses_an_unsupported_device_as_a_configuration_error(tmp_path, monkeypatch):
    """The daemon's own refusal of a device no driver takes is exit 2, like a bad key: the
    unit does not restart it (RestartPreventExitStatus=2) and ExecStopPost= gives the NIC
    back instead of keeping it on vfio-pci for a restart that cannot help."""
    import functools

    import ixyd.model
    import ixyd.service

    i210 = functools.partial(ixyd.model.ModelNic, device_id=0x1533)
    monkeypatch.setattr(ixyd.model, "ModelNic", i210)
    config = tmp_path / "lab.toml"
    config.write_text('[[port]]\naddress = "lab.0"\nbackend = "model"\n')
    args = ["lab", "--config", str(config), "--run-dir", str(tmp_path), "--metrics", "off"]
    status = ixyd.service.main([*args, "--state-dir", str(tmp_path)])
    assert status == 2
    assert (
        ixyd.host.restart_may_follow(
            {"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": str(status)}
        )
        is False
    )


def test_prepare_refuses_a_config_file_others_may_change(host):
    """root acts on /etc/ixyd/<instance>.toml: a file (or directory above it) that another
    user owns or may write is refused before anything is read from it or written to /sys."""
    kernel, config_dir, dev, marks = host
    config = config_dir / f"{INSTANCE}.toml"
    config.write_text(f'[[port]]\naddress = "{INSTANCE}"\n')
    config.chmod(0o644)

    def refused(words: str) -> None:
        with pytest.raises(ixyd.config.ConfigError, match=re.escape(words)):
            prepare(
                INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks)
            )
        assert kernel.writes == [] and kernel.driver(INSTANCE) == "ixgbe"

    os.chown(config, 65534, 0)
    refused(f"{config} is owned by uid 65534, not root")
    os.chown(config, 0, 0)
    config.chmod(0o666)
    refused(f"{config} is writable by its group or others (mode 0666)")
    config.chmod(0o620)
    refused("writable by its group or others (mode 0620)")
    config.chmod(0o644)
    config_dir.chmod(0o777)  # anyone could replace the file
    refused(f"{config_dir} (on the way to {config}) is writable by its group or others")
    config_dir.chmod(0o755)
    alice = config_dir.parent / "alice.toml"  # a link from a root-owned place to a user's file
    alice.write_text(config.read_text())
    os.chown(alice, 65534, 0)
    config.unlink()
    config.symlink_to(alice)
    refused(f"{config} (that is {alice}) is owned by uid 65534")
    config.unlink()
    config.write_text(alice.read_text())
    prepare(INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert kernel.driver(INSTANCE) == "vfio-pci"


def test_prepare_refuses_a_group_whose_vfio_member_is_not_this_instances(host):
    """Another function of the NIC's IOMMU group already on vfio-pci (a VM's, another VFIO
    program's): handing the group node to ixyd would hand it that device as well."""
    kernel, config_dir, dev, marks = host
    sibling = INSTANCE[:-1] + "1"
    make_device(Path(kernel.root), sibling, group=GROUP)
    bind(kernel, sibling, "vfio-pci")
    with pytest.raises(HostError, match=f"also holds {sibling}, which is on vfio-pci but is not"):
        prepare(INSTANCE, a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks))
    assert kernel.writes == [] and kernel.driver(INSTANCE) == "ixgbe" and not marks.exists()
    assert stat.S_IMODE((dev / str(GROUP)).stat().st_mode) == 0o600

    # the same function as a port of this instance: the group is the instance's
    (config_dir / "pair.toml").write_text(
        f'[[port]]\naddress = "{INSTANCE}"\n[[port]]\naddress = "{sibling}"\n'
    )
    bindings = prepare(
        "pair", a_group().gr_name, sysfs=kernel, dev_dir=str(dev), mark_dir=str(marks)
    )
    assert [b.address for b in bindings] == [INSTANCE, sibling]


def test_install_refuses_a_bin_dir_or_interpreter_others_may_change(tmp_path):
    """root runs ixyd-host (ExecStartPre=+) with the interpreter from its #! line: a bin dir,
    program or interpreter another user owns or may write would give that user root."""
    (tmp_path / "opt/ixyd/bin").mkdir(parents=True)
    python = tmp_path / "opt/ixyd/bin/python3"
    python.write_text("")
    python.chmod(0o755)
    scripts(tmp_path, "/opt/ixyd/bin", "/opt/ixyd/bin/python3")
    bin_dir = tmp_path / "opt/ixyd/bin"

    def refused(words: str) -> None:
        with pytest.raises(HostError, match=re.escape(words)):
            install(str(tmp_path), bin_dir="/opt/ixyd/bin", apply=False)
        assert not (tmp_path / "etc").exists()

    bin_dir.chmod(0o777)
    refused("/opt/ixyd/bin is writable by its group or others (mode 0777)")
    bin_dir.chmod(0o755)
    os.chown(bin_dir, 1234, 1234)
    refused("/opt/ixyd/bin is owned by uid 1234, not root")
    os.chown(bin_dir, 0, 0)
    os.chown(python, 1234, 0)
    refused("/opt/ixyd/bin/python3 is owned by uid 1234, not root")
    os.chown(python, 0, 0)
    (tmp_path / "opt").chmod(0o1777)  # sticky: others cannot replace root's entries
    install(str(tmp_path), bin_dir="/opt/ixyd/bin", apply=False)
    assert (tmp_path / "etc/systemd/system/ixyd@.service").exists()


def test_programs_root_runs_get_roots_environment_not_the_daemon_users(monkeypatch):
    """ExecStartPre=+ inherits HOME=/var/lib/ixyd (User=ixyd's, which ixyd may write): what
    ixyd-host runs (modprobe, udevadm, systemd-sysusers) gets root's HOME and a fixed PATH.
    The interpreter itself runs with -I (tests/nspawn/test_root_helpers.py)."""
    monkeypatch.setenv("HOME", "/var/lib/ixyd")
    monkeypatch.setenv("PATH", f"/var/lib/ixyd/bin:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", "/var/lib/ixyd")
    ixyd.host._run(["sh", "-c", 'test "$HOME" = /root && test -z "$PYTHONPATH"'])
    ixyd.host._run(["sh", "-c", 'case ":$PATH:" in *:/var/lib/ixyd/bin:*) exit 1;; esac'])
