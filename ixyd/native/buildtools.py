"""Shared by the cffi builders (build_datapath.py, build_vfio.py, model/build_engine.py).

The builders run in two ways: setuptools executes them from the project root during
`pip install` (and refuses absolute source paths), and developers run them directly to
build in place (through cffi's compile(), which changes into its tmpdir first, so paths
must be absolute there). They import this file by path, not as a package module, because
setuptools executes a builder file on its own.
"""

from __future__ import annotations

import glob
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_path(path: str, in_place: bool) -> str:
    """`path` as the current kind of build needs it: absolute in place, else root-relative."""
    return path if in_place else os.path.relpath(path, ROOT)


def build_in_place(ffibuilder, package_dir: str) -> str:
    """Compile into <project>/build/cffi and install the module into `package_dir`.

    The file gets pip's name (module.abi3.so) and is renamed into place, never copied
    over: a running process that has the old file mapped keeps it (a copy over it would
    raise SIGBUS there). Twins with another suffix (module.cpython-3xx-...so) are removed,
    because Python prefers them and a stale one would shadow every fresh build.
    """
    # one directory per build process: two in-place builds at once (two shells, a test
    # run and an editor) must not compile over each other's objects
    build_dir = os.path.join(ROOT, "build", "cffi", str(os.getpid()))
    os.makedirs(build_dir, exist_ok=True)
    try:
        built = ffibuilder.compile(tmpdir=build_dir, verbose=False)
        stem = os.path.basename(built).split(".")[0]
        target = os.path.join(package_dir, stem + ".abi3.so")
        staging = f"{target}.{os.getpid()}.tmp"
        shutil.copyfile(built, staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    for twin in glob.glob(os.path.join(package_dir, stem + ".*.so")):
        if twin != target:
            os.remove(twin)
    return target
