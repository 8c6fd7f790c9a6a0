"""The unit's root lines (ExecStartPre=+ prepare, ExecStopPost=+ release) under systemd 252
are not steered by what user ixyd controls.

systemd gives "+" lines the environment of User=ixyd, HOME=/var/lib/ixyd included, and
user ixyd may write there. With user site-packages enabled (a venv that includes the
system site-packages), a Python started without -I imports
$HOME/.local/lib/pythonX.Y/site-packages/usercustomize.py: before the fix, user ixyd's
code ran as uid 0 in prepare and release. The test plants such a file and checks that the
daemon (as ixyd, where it is harmless: that proves the plant works) ran it and root did not.
"""

from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.nspawn

NAME = "host-usersite"  # this test's own instance: one model port, no metrics endpoint
SERVICE = f"ixyd@{NAME}.service"
CONFIG = """\
metrics = "off"

[[port]]
address = "usersite.0"
rx_ring = 64
tx_ring = 64
pool_size = 256
"""
MARKS = "/var/lib/ixyd/usercustomize-ran"  # + "-<uid>-<pid>", one file per import
# leaves the command line of every Python that imports it in a file named by its uid (one
# file each: a shared log that root made first would not be writable for user ixyd)
USERCUSTOMIZE = f"""\
import os
with open("/proc/self/cmdline", "rb") as f:
    command = f.read().replace(b"\\0", b" ").decode(errors="replace").strip()
with open(f"{MARKS}-{{os.getuid()}}-{{os.getpid()}}", "w") as f:
    f.write(command)
"""


@pytest.fixture
def planted(container):
    """User site-packages on in /opt/ixyd, user ixyd's usercustomize.py in its site dir and
    this test's instance configured; all undone afterwards."""
    venv_cfg = container.root / "opt/ixyd/pyvenv.cfg"
    original = venv_cfg.read_text()
    venv_cfg.write_text(
        re.sub(
            r"(?m)^include-system-site-packages = \w+$",
            "include-system-site-packages = true",
            original,
        )
    )
    version = container.run(
        ["/opt/ixyd/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    ).stdout.strip()
    site = f"/var/lib/ixyd/.local/lib/python{version}/site-packages"
    uid, gid = (int(container.run(["id", flag, "ixyd"]).stdout) for flag in ("-u", "-g"))
    # made by user ixyd, as the daemon (which may write its state directory) could
    container.run(["runuser", "-u", "ixyd", "--", "mkdir", "-p", site])
    plant = container.root / site.lstrip("/") / "usercustomize.py"
    plant.write_text(USERCUSTOMIZE)
    os.chown(plant, uid, gid)
    config = container.root / "etc/ixyd" / f"{NAME}.toml"
    config.write_text(CONFIG)
    try:
        yield uid
    finally:
        container.run(["systemctl", "stop", SERVICE, f"ixyd@{NAME}.socket"], timeout=60)
        container.run(["systemctl", "reset-failed", SERVICE], check=False)
        venv_cfg.write_text(original)
        container.run(["sh", "-c", f"rm -rf /var/lib/ixyd/.local {MARKS}-*"])
        config.unlink(missing_ok=True)


def test_root_lines_do_not_run_the_daemon_users_usercustomize(container, planted):
    daemon_uid = planted
    container.run(["systemctl", "start", SERVICE], timeout=60)
    container.run(["systemctl", "stop", SERVICE], timeout=60)
    journal = container.run(["journalctl", "-u", SERVICE, "--no-pager", "-o", "cat"]).stdout
    assert "model ports only, nothing to bind" in journal  # prepare ran ...
    assert f"{NAME}: gave back no NIC" in journal  # ... and so did release
    listing = container.run(["sh", "-c", f"grep -H . {MARKS}-* || true"]).stdout
    runs = re.findall(rf"^{MARKS}-(\d+)-\d+:(.*)$", listing, re.M)
    # root's prepare and release did not import it ...
    assert [command for uid, command in runs if uid == "0"] == []
    # ... while the plant works: the daemon (user ixyd, not isolated) did
    assert any(uid == str(daemon_uid) and "/opt/ixyd/bin/ixyd" in cmd for uid, cmd in runs), runs
