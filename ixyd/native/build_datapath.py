"""cffi API-mode builder of `ixyd._datapath` (the per-packet C code in this directory).

setup.py picks up `ffibuilder`. Run this file directly to build the module in place for
development: the extension is compiled under build/cffi and copied into ixyd/.

The cdef is the marked block of datapath.h, so the Python view and the C header cannot
drift apart; cffi also checks each struct's size and field offsets against the compiler's.
"""

from __future__ import annotations

import os
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


sys.path.insert(0, HERE)
import buildtools  # noqa: E402  (by path: setuptools runs this file on its own)

_IN_PLACE = __name__ == "__main__"


def _path(path: str) -> str:
    return buildtools.source_path(path, _IN_PLACE)


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


if __name__ == "__main__":
    print(buildtools.build_in_place(ffibuilder, os.path.dirname(HERE)), file=sys.stderr)
