#!/usr/bin/env bash
# Why did a bad-input error of the native op crash the process on the first GPU run (2026-12-04,
# torch 2.11+cu130, H200: tests/test_native.py::test_clear_errors segfaulted instead of raising)?
# Each probe runs in its own process: our op on CPU and on CUDA tensors (CUDA build), our op from a
# CPU-only build, and a minimal TORCH_LIBRARY op of our own that only throws, plus a backtrace.
#   bash benchmarks/gpu/diagnose_native_errors.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-native-errors}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
probe=$(mktemp --suffix=.py)
cat > "$probe" <<'PY'
import sys, torch
from gard_kernels.sketch import native
dev = sys.argv[1]
assert native.is_available(dev), native.unavailable_reason(dev)
x, dy = torch.randn(2, 3, 7, device=dev), torch.randn(2, 3, 5, device=dev)
try:
    torch.ops.gard_kernels.sketch(x, dy, 1, 2, 4, 3, 1.0, torch.zeros(3, 4, device=dev), False)
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0])
PY
report() { printf '%-44s rc %s: %s\n' "$1" "$2" "$(grep -v '^\s*$' "$3" | tail -n 1 | cut -c1-160)" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"
for dev in cpu cuda; do
  timeout 120 python "$probe" $dev > "$out/op_$dev.log" 2>&1; report "our op, CUDA build, $dev tensors" $? "$out/op_$dev.log"
done
CUDA_VISIBLE_DEVICES= TORCH_EXTENSIONS_DIR=/tmp/gard_ext_cpu_only timeout 180 python "$probe" cpu > "$out/op_cpu_only_build.log" 2>&1
report "our op, CPU-only build, cpu tensors" $? "$out/op_cpu_only_build.log"
timeout 180 python - > "$out/minimal.log" 2>&1 <<'PY'
import torch
from torch.utils.cpp_extension import load_inline
src = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
void boom(const at::Tensor& t) { TORCH_CHECK(t.dim() == 2, "boom: want 2-D, got ", t.sizes()); }
TORCH_LIBRARY(gard_probe, m) { m.def("boom(Tensor t) -> ()"); }
TORCH_LIBRARY_IMPL(gard_probe, CPU, m) { m.impl("boom", &boom); }
"""
load_inline("gard_probe", cpp_sources=src, is_python_module=False, verbose=False)
try:
    torch.ops.gard_probe.boom(torch.zeros(2, 2, 2))
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0])
PY
report "minimal TORCH_LIBRARY op that throws" $? "$out/minimal.log"
g++ --version | head -n 1 >> "$out/summary.txt"
python -c "import torch; print('torch built with', torch.__config__.show().split('GCC')[1].split()[0] if 'GCC' in torch.__config__.show() else '?', 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)" >> "$out/summary.txt" 2>&1
if command -v cuda-gdb > /dev/null; then
  timeout 150 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args python "$probe" cpu > "$out/backtrace.log" 2>&1
  echo "backtrace: $(grep -m 8 '^#' "$out/backtrace.log" | cut -c1-200 | tr '\n' '|')" >> "$out/summary.txt"
fi
rm -f "$probe"
cat "$out/summary.txt"
