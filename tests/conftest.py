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
    """Daemons a test starts (test_service_e2e.Daemon): killed afterwards if still running."""
    started = []
    yield started
    for d in started:
        d.kill()
