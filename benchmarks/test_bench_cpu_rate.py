"""CPU compute rate of the fused sketch against torch matmul in the same run (GFLOP/s).

At k = 16 the sketch does 8 FLOPs per byte read in float32 (16 in bfloat16), more than the cores
can feed from memory, so on the CPU it is compute-bound and the matmul rate of the same dtype is
its yardstick. Targets: float32 sketch >= 0.85 of float32 matmul (measured 0.89 before the bf16
work: keep it), bfloat16 sketch >= 0.6 of bfloat16 matmul (AVX-512 BF16 path). The bf16 float
fallback is listed for comparison, without a target.
"""
import pytest
import torch

import gard_kernels as gk
from gard_kernels.sketch import native

from .conftest import tag
from .shapes import SKETCH_SHAPES

MATMUL_SIZE = 2048
RATE_SHAPE = "N4096-d2048"


def _sketch_flops(s) -> int:
    """Projection and outer-product FLOPs of one sketch call (benchmarks/gpu/roofline.py)."""
    return 2 * s["n"] * (s["d_in"] * s["k_in"] + s["d_out"] * s["k_out"] + s["k_in"] * s["k_out"])


def _rate(benchmark, role, flops, target=None):
    tag(benchmark, role)
    benchmark.extra_info["flops"] = flops
    if target is not None:
        benchmark.extra_info["target_rate"] = target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_rate(benchmark, dtype):
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    benchmark.group = f"cpu rate {str(dtype).removeprefix('torch.')}"
    _rate(benchmark, "baseline", 2 * MATMUL_SIZE**3)
    benchmark(lambda: a @ b)


@pytest.mark.parametrize(
    "dtype, bf16_dot, target",
    [(torch.float32, True, 0.85), (torch.bfloat16, True, 0.6), (torch.bfloat16, False, None)],
    ids=["fp32", "bf16-avx512bf16", "bf16-float-fallback"],
)
def test_fused_sketch_rate(benchmark, dtype, bf16_dot, target):
    assert native.is_available("cpu"), native.unavailable_reason("cpu")
    if dtype == torch.bfloat16 and bf16_dot and not native.cpu_bf16_dot_supported():
        pytest.skip("this CPU has no AVX-512 BF16: the bf16 rate is the fallback's")
    s = SKETCH_SHAPES[RATE_SHAPE]
    sk = gk.GradientSketch(s["d_in"], s["d_out"], s["k_in"], s["k_out"], seed=1)
    x, dy = torch.randn(s["n"], s["d_in"]).to(dtype), torch.randn(s["n"], s["d_out"]).to(dtype)
    out = torch.empty(s["k_out"], s["k_in"])
    benchmark.group = f"cpu rate {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["backend"] = "cpp" + ("" if dtype == torch.float32 else (" vdpbf16ps" if bf16_dot else " float"))
    _rate(benchmark, "candidate", _sketch_flops(s), target)
    with native.cpu_bf16_dot(bf16_dot):
        benchmark(lambda: native.sketch_native(x, dy, sk.key_in, sk.key_out, sk.k_in, sk.k_out, sk.scale, out, False))
