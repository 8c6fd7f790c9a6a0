"""cffi API-mode build of the 82599 model's packet engine (module ixyd.model._engine)."""

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_from_header(path: str) -> str:
    """The header is the single declaration; strip what cffi's parser does not take."""
    text = open(path).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        if line.startswith(("#if", "#endif", "#include", "#define IXYD_MODEL_ENGINE_H")):
            continue
        if line.startswith("#define"):
            line = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)u\b", r"\1", line)
        lines.append(line)
    return "\n".join(lines)


sys.path.insert(0, os.path.join(os.path.dirname(HERE), "native"))
import buildtools  # noqa: E402  (by path: setuptools runs this file on its own)

_IN_PLACE = __name__ == "__main__"


def _path(path: str) -> str:
    return buildtools.source_path(path, _IN_PLACE)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(os.path.join(HERE, "engine.h")))
ffibuilder.set_source(
    "ixyd.model._engine",
    '#include "engine.h"',
    sources=[_path(os.path.join(HERE, "engine.c"))],
    depends=[_path(os.path.join(HERE, "engine.h"))],
    include_dirs=[_path(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    # Development build in place: python ixyd/model/build_engine.py
    print(buildtools.build_in_place(ffibuilder, HERE), file=sys.stderr)
