#!/usr/bin/env bash
# Builds a wheel, installs it into a directory of its own outside the checkout, and checks that the
# installed package builds its C++ backend from the shipped sources and matches the float64
# reference. The check runs in the calling interpreter, whatever environment that is (the system
# Python, a virtualenv, a conda env), so torch/numpy/ninja come from where `make install` put them
# and nothing downloads: the wheel goes into its own --target directory with --no-deps, and only
# that directory is put first on the path (PYTHONPATH precedes site-packages and the editable
# install's finder). Runs in about a minute, most of it the C++ compile (a fresh
# TORCH_EXTENSIONS_DIR, so a cached build from the checkout cannot stand in for the installed
# package's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gard_wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The build backend of the calling environment when it has one (nothing to fetch); an environment
# without setuptools (a Python >= 3.12 venv) builds in pip's isolated environment instead.
isolation=--no-build-isolation
"$PYTHON" -c "import setuptools, wheel" 2>/dev/null || isolation=
"$PYTHON" -m pip wheel . --no-deps $isolation -q -w "$work/dist"
"$PYTHON" -m pip install -q --no-deps --no-index --target "$work/site" "$work"/dist/gard_kernels-*.whl

# From a directory outside the checkout, so neither '' on sys.path nor the editable install of
# the checkout can supply gard_kernels: the check asserts the import comes from the wheel's directory.
cd "$work"
PYTHONPATH="$work/site" TORCH_EXTENSIONS_DIR="$work/torch_extensions" "$PYTHON" - "$work/site" <<'PY'
import os
import sys
import warnings
from pathlib import Path

import torch

import gard_kernels
from gard_kernels import reference
from gard_kernels.sketch import native

site = Path(sys.argv[1]).resolve()
package = Path(gard_kernels.__file__).resolve().parent
assert site in package.parents, f"gard_kernels was imported from {package}, not from the wheel installed in {site}"
csrc = native._csrc_dir()
assert csrc == package / "_csrc", f"the native sources resolved to {csrc}, expected the wheel's {package / '_csrc'}"
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback warning is a failure here
    available = native.is_available("cpu")
assert available, f"the C++ backend did not build from the wheel: {native.unavailable_reason('cpu')}"
assert "cpp" in gard_kernels.available_backends("cpu"), gard_kernels.available_backends("cpu")

torch.manual_seed(0)
tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
for dtype, (n, d_in, d_out, k_in, k_out) in [
    (torch.float32, (123, 77, 45, 16, 24)),
    (torch.bfloat16, (301, 130, 67, 16, 16)),
    (torch.float16, (5, 3, 2000, 5, 33)),
]:
    sk = gard_kernels.GradientSketch(d_in, d_out, k_in, k_out, seed=3)
    x, dy = torch.randn(n, d_in).to(dtype), torch.randn(n, d_out).to(dtype)
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    out = torch.full((k_out, k_in), float("nan"))
    native.sketch_native(x, dy, sk.key_in, sk.key_out, k_in, k_out, sk.scale, out, False)
    error = ((out.double() - expected).norm() / expected.norm()).item()
    assert error < tolerance[dtype], f"{dtype} {n}x{d_in}x{d_out}: relative error {error:.2e}"
    print(f"check_wheel: {dtype} [{n}, {d_in}] x [{n}, {d_out}] -> [{k_out}, {k_in}]: rel. error {error:.1e}")
# The extension was compiled here, from the wheel's sources, not found in a cache.
built = sorted(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("*.so"))
assert built, f"no extension library under {os.environ['TORCH_EXTENSIONS_DIR']}"
print(f"check_wheel: the C++ backend builds from {csrc} ({built[0].name}) and matches the float64 reference")
PY
