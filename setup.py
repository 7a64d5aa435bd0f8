"""Package layout; the rest of the metadata lives in pyproject.toml.

The csrc/ sources ship inside the package as gard_kernels/_csrc so that the JIT build in
gard_kernels/sketch/native.py also works from a wheel or a `pip install .`, not only from a source
checkout. The package list is written here rather than in pyproject's [tool.setuptools.packages.find]:
a `find` table there replaces the package list of setup() and so silently drops the mapped
gard_kernels._csrc package (tests/test_packaging.py checks the wheel for it).
"""
from setuptools import find_packages, setup

CSRC_PACKAGE = "gard_kernels._csrc"
# Every file the JIT build compiles or includes; tests/test_packaging.py compares this with csrc/.
CSRC_FILES = ["*.h", "*.cpp", "*.sh", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"]

setup(
    packages=find_packages(include=["gard_kernels", "gard_kernels.*"]) + [CSRC_PACKAGE],
    package_dir={CSRC_PACKAGE: "csrc"},
    package_data={CSRC_PACKAGE: CSRC_FILES},
)
