# cffi API-mode extensions are declared here because setuptools' pyproject
# table has no field for cffi_modules; everything else lives in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=[
        "ixyd/native/build_datapath.py:ffibuilder",
        "ixyd/native/build_vfio.py:ffibuilder",
        "ixyd/model/build_engine.py:ffibuilder",
    ],
)
