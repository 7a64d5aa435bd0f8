"""Minimal setup.py: metadata lives in pyproject.toml.

The csrc/ sources are shipped inside the package as gard_kernels/_csrc so that the JIT build in
gard_kernels/sketch/native.py also works from a wheel, not only from a source checkout.
"""
from setuptools import setup

setup(
    package_dir={"gard_kernels._csrc": "csrc"},
    package_data={"gard_kernels._csrc": ["*.h", "*.cpp", "*.sh", "cpu/*.cpp", "cuda/*.cu", "cuda/*.h"]},
)
