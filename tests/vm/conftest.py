"""Fixtures for the guest tests: `vm` prepares the host once per session (QEMU, guest kernel,
initramfs; see harness.py) and fails every test that uses it, with apt's words, when it cannot."""

import pytest
from harness import HostSetupError, VmHost, ensure_host


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a QEMU guest with a virtual IOMMU and two igb NICs (tests/vm)"
    )


@pytest.fixture(scope="session")
def vm() -> VmHost:
    """The prepared host: call vm.run(command, ...) to boot a guest and run a command."""
    try:
        return ensure_host()
    except HostSetupError as e:
        pytest.fail(
            f"the VM tests need QEMU and a guest kernel, and the host setup failed:\n{e}",
            pytrace=False,
        )
