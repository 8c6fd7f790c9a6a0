"""Fixtures for the systemd tests: `container` boots the cached Debian root (nspawn_harness.py)
with this checkout installed, the units installed by `ixyd-host install` and one instance
configured; it fails every test that uses it, with the reason, when the host cannot."""

from __future__ import annotations

import os

import pytest
from nspawn_harness import (
    INSTANCE,
    INSTANCE_CONFIG,
    TEST_DROP_IN,
    Container,
    NspawnError,
    ensure_base_root,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nspawn: boots Debian with systemd in systemd-nspawn (tests/nspawn)"
    )


def _prepare(container: Container) -> None:
    etc = container.root / "etc"
    (etc / "ixyd").mkdir(exist_ok=True)
    (etc / "ixyd" / f"{INSTANCE}.toml").write_text(INSTANCE_CONFIG)
    drop_in = etc / "systemd" / "system" / "ixyd@.service.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "90-test.conf").write_text(TEST_DROP_IN)


@pytest.fixture(scope="session")
def container():
    """The booted container; `container.install` is the output of `ixyd-host install`."""
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, mount, systemd-nspawn)")
    try:
        base = ensure_base_root()
        with Container.boot(base, prepare=_prepare) as booted:
            booted.install = booted.run(["/opt/ixyd/bin/ixyd-host", "install"])
            yield booted
    except NspawnError as e:
        pytest.fail(f"the systemd container could not be set up:\n{e}", pytrace=False)
