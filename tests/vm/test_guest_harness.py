"""The guest harness itself: results come back, the guest has what VFIO scenarios need,
timeouts end the guest, and raw VFIO works from plain Python inside it."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import GUEST_PYTHON, IGB_PCI_ID, IGB_PORTS, SCENARIOS, GuestTimeout, VmHost

pytestmark = pytest.mark.vm

VENV_PYTHON = GUEST_PYTHON  # the interpreter these tests run under, by absolute path


def qemu_processes_using(path: Path) -> list[str]:
    """Command lines of the QEMU processes whose run directory lies under `path`."""
    found = subprocess.run(
        ["pgrep", "-a", "-f", "qemu-system-x86_64"], capture_output=True, text=True
    ).stdout.splitlines()
    return [line for line in found if f"ixydvm_out={path}/" in line]


def test_exit_code_output_and_kernel_command_line_come_back(vm: VmHost):
    result = vm.run("cat /proc/cmdline; echo to-stderr >&2; exit 3", timeout=60)

    assert result.returncode == 3, result.console
    assert "intel_iommu=on" in result.output
    assert "to-stderr" in result.output
    assert "Linux version " + vm.kernel_version.split("+")[0] in result.console
    assert "Command line:" in result.dmesg


def test_guest_has_iommu_vfio_and_two_igb_in_own_groups_at_known_addresses(vm: VmHost):
    script = f"""
        test -e /sys/class/iommu/dmar0 && echo dmar0-present
        test -c /dev/vfio/vfio && echo vfio-present
        echo "memlock $(ulimit -l)"
        {VENV_PYTHON} {SCENARIOS / "guest_pci.py"}
    """
    result = vm.run(script, timeout=60)

    assert result.returncode == 0, result.output
    assert "dmar0-present" in result.output
    assert "vfio-present" in result.output
    assert "DMAR: IOMMU enabled" in result.dmesg
    assert "memlock unlimited" in result.output  # VFIO pins DMA maps against RLIMIT_MEMLOCK
    # guest_pci.py prints "<bdf> <mac> iommu_group=<n> driver=<name>" per 8086:10c9 function
    igb = [line.split() for line in result.output.splitlines() if line.startswith("0000:")]
    assert {bdf: mac for bdf, mac, *_ in igb} == {port.bdf: port.mac for port in IGB_PORTS}
    groups = {group for _, _, group, _ in igb}
    assert len(groups) == 2, f"the two {IGB_PCI_ID} functions share an IOMMU group: {igb}"


def test_compiled_ixyd_modules_import_in_guest(vm: VmHost):
    # `-c` puts the working directory, the repo root, first on sys.path
    result = vm.run(
        [
            VENV_PYTHON,
            "-c",
            "import ixyd, ixyd._datapath, ixyd.model._engine, os, shutil, sys; "
            "print(sys.executable, shutil.which(os.path.basename(sys.executable)))\n"
            "print(ixyd.__file__)",
        ],
        timeout=60,
    )

    assert result.returncode == 0, result.output
    assert result.output.strip().endswith("ixyd/__init__.py")
    # the guest runs the interpreter of this test session, also first on its PATH by name
    assert result.output.split()[:2] == [sys.executable, sys.executable]


def test_timeout_kills_the_guest_quickly_and_leaves_no_qemu(vm: VmHost, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run directory goes here
    started = time.monotonic()
    with pytest.raises(GuestTimeout, match="QEMU killed"):
        vm.run("sleep 600", timeout=3)

    assert time.monotonic() - started < 10
    assert qemu_processes_using(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # run directory removed


def test_raw_vfio_container_group_and_iova_ranges(vm: VmHost):
    result = vm.run([VENV_PYTHON, str(SCENARIOS / "raw_vfio_smoke.py")], timeout=60)

    assert result.returncode == 0, result.output
    summary = json.loads(result.output.split("RESULT ", 1)[1])
    assert summary["mac"] == "52:54:00:00:00:02"
    assert all(end < 0xFEE00000 or start > 0xFEEFFFFF for start, end in summary["iova_ranges"])


def test_systemd_as_init_runs_the_command_as_a_unit_on_a_writable_root(vm: VmHost):
    script = """
        echo "pid1 $(cat /proc/1/comm)"
        echo "state $(systemctl is-system-running)"
        echo "unit $(systemctl show -p Id --value "$(cat /proc/self/cgroup | sed -n 's|.*/||p')")"
        touch /etc/ixyd-vm-writable && echo root-writable
        echo "vfio $(stat -c %a /dev/vfio/vfio)"
        echo "memlock $(ulimit -l)"
        ip -br link show lo
        exit 3
    """
    result = vm.run(script, timeout=90, init="systemd")

    assert result.returncode == 3, result.output + result.journal[-3000:]
    lines = result.output.splitlines()
    assert "pid1 systemd" in lines
    assert "state running" in lines  # no failed unit, no job left
    assert "unit ixyd-vm-command.service" in lines
    assert "root-writable" in lines  # overlay root
    assert "vfio 666" in lines  # the kernel's mode: no static node from kmod-static-nodes
    assert "memlock unlimited" in lines
    assert any(line.startswith("lo ") and "UP" in line for line in lines)
    assert "Startup finished" in result.journal
    assert result.boot is not None and 0 < result.boot < result.elapsed
