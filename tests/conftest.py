import os
import shutil
import sys
import tempfile

import pytest

# the test-only ring driver lives next to the tests
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def run_dir():
    """A directory for daemons' sockets and state: short (AF_UNIX paths are limited) and
    searchable by `nobody`. Some modules define their own."""
    path = tempfile.mkdtemp(prefix="ixyd-run-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons():
    """Daemons a test starts (hosttools.Daemon): killed afterwards if still running."""
    started = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture(autouse=True)
def close_clients():
    """Raw control-socket clients (hosttools.Client) a test opened: closed afterwards."""
    yield
    hosttools = sys.modules.get("hosttools")  # loaded by the tests that use it
    while hosttools and hosttools.Client.opened:
        hosttools.Client.opened.pop().close()
