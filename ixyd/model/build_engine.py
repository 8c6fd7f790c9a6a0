"""cffi API-mode build of the 82599 model's packet engine (module ixyd.model._engine)."""

import glob
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
    import shutil

    root = os.path.dirname(os.path.dirname(HERE))
    built = ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=False)
    target = os.path.join(HERE, os.path.basename(built).split(".")[0] + ".abi3.so")
    # copy, then rename: overwriting the file in place would change the pages of a module a
    # running process has mapped (SIGBUS); a rename leaves that process its old file
    shutil.copyfile(built, target + ".tmp")
    os.replace(target + ".tmp", target)
    # the same file name as pip's build (module.abi3.so): Python prefers a module.cpython-3xx
    # twin over it, so a stale one of those would shadow every fresh build; remove it
    stem = os.path.basename(target).split(".")[0]
    for twin in glob.glob(os.path.join(os.path.dirname(target), stem + ".*.so")):
        if twin != target:
            os.remove(twin)
