"""cffi API-mode build of the 82599 model's packet engine (module ixyd.model._engine)."""

import os
import re

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


# setuptools (pip install) builds from the project root and refuses absolute source paths;
# the in-place build below goes through cffi's compile(), which changes into its tmpdir
# first, so it needs absolute ones.
_IN_PLACE = __name__ == "__main__"
_ROOT = os.path.dirname(os.path.dirname(HERE))


def _path(path: str) -> str:
    return path if _IN_PLACE else os.path.relpath(path, _ROOT)


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
    root = os.path.dirname(os.path.dirname(HERE))
    os.chdir(root)
    ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=False)
    import glob
    import shutil

    for so in glob.glob(os.path.join(root, "build", "cffi", "ixyd", "model", "_engine*.so")):
        shutil.copy(so, os.path.join(HERE, os.path.basename(so)))
