#!/usr/bin/env bash
# Compiles the C++ sources for x86-64 CPUs older than this one (no AVX-512, no F16C), as the JIT
# build would on them (it uses -march=native). The AVX-512 BF16 path must compile there too: its
# functions carry their own target attribute, and anything that calls an intrinsic without that
# attribute (a lambda inside such a function, say) builds only where -march already enables it.
# Takes ~15 s; skips on other architectures.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "check_cpu_compiles: not an x86-64 machine, skipping"
  exit 0
fi
CXX="${CXX:-c++}"
mapfile -t includes < <("$PYTHON" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()['include']]:
    print('-isystem' + path)
")
# x86-64: no AVX at all; v3: AVX2 + F16C; v4: AVX-512 without BF16. bindings.cpp has no
# target-specific code. -Wno-psabi: the float path's 8-lane vectors change the ABI without AVX,
# which is harmless inside one translation unit.
for march in x86-64 x86-64-v3 x86-64-v4; do
  "$CXX" -std=c++17 -O2 -march="$march" -fopenmp -Wall -Wno-psabi -c cpu/sketch_cpu.cpp -o /dev/null -I. "${includes[@]}"
  echo "check_cpu_compiles: cpu/sketch_cpu.cpp compiles for -march=$march"
done
