"""cffi API-mode builder of `ixyd._datapath` (the per-packet C code in this directory).

setup.py picks up `ffibuilder`. Run this file directly to build the module in place for
development: the extension is compiled under build/cffi and copied into ixyd/.

The cdef is the marked block of datapath.h, so the Python view and the C header cannot
drift apart; cffi also checks each struct's size and field offsets against the compiler's.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "datapath.h")
SOURCE = os.path.join(HERE, "datapath.c")
MODULE = "ixyd._datapath"
# Portable code: no -march=native, the module must run on any x86-64 (or other LE) host.
COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]

_CDEF_BEGIN = "/* --- cffi cdef begin --- */"
_CDEF_END = "/* --- cffi cdef end --- */"


def read_cdef(header: str = HEADER) -> str:
    """Return the declarations between the cdef markers of the header."""
    with open(header, encoding="utf-8") as f:
        text = f.read()
    try:
        start = text.index(_CDEF_BEGIN) + len(_CDEF_BEGIN)
        end = text.index(_CDEF_END, start)
    except ValueError as exc:
        raise RuntimeError(f"{header}: cffi cdef markers not found") from exc
    return text[start:end]


# setuptools (pip install) builds from the project root and refuses absolute source paths;
# the in-place build below goes through cffi's compile(), which changes into its tmpdir
# first, so it needs absolute ones.
_IN_PLACE = __name__ == "__main__"
_ROOT = os.path.dirname(os.path.dirname(HERE))


def _path(path: str) -> str:
    return path if _IN_PLACE else os.path.relpath(path, _ROOT)


ffibuilder = cffi.FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    MODULE,
    '#include "datapath.h"',
    sources=[_path(SOURCE)],
    include_dirs=[_path(HERE)],
    depends=[_path(HEADER)],
    extra_compile_args=COMPILE_ARGS,
)


def build_in_place() -> str:
    """Compile into <project>/build/cffi and copy the module next to ixyd's sources."""
    package_dir = os.path.dirname(HERE)
    build_dir = os.path.join(os.path.dirname(package_dir), "build", "cffi")
    os.makedirs(build_dir, exist_ok=True)
    built = ffibuilder.compile(tmpdir=build_dir, verbose=False)
    target = os.path.join(package_dir, os.path.basename(built).split(".")[0] + ".abi3.so")
    shutil.copyfile(built, target + ".tmp")
    os.replace(target + ".tmp", target)  # atomic: a running process keeps its old mapping
    # the same file name as pip's build (module.abi3.so): Python prefers a module.cpython-3xx
    # twin over it, so a stale one of those would shadow every fresh build; remove it
    stem = os.path.basename(target).split(".")[0]
    for twin in glob.glob(os.path.join(os.path.dirname(target), stem + ".*.so")):
        if twin != target:
            os.remove(twin)
    return target


if __name__ == "__main__":
    print(build_in_place(), file=sys.stderr)
