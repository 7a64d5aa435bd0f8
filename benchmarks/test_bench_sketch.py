"""Fused sketch vs materialising G, and vs the torch two-matmul path with stored projections."""
import pytest
import torch

import gard_kernels as gk

from .conftest import tag
from .shapes import SKETCH_SHAPES


def _best_cpu_backend() -> str:
    return "cpp" if "cpp" in gk.available_backends("cpu") else "torch"


def _inputs(shape):
    x = torch.randn(shape["n"], shape["d_in"])
    dy = torch.randn(shape["n"], shape["d_out"])
    sk = gk.GradientSketch(shape["d_in"], shape["d_out"], shape["k_in"], shape["k_out"], seed=1)
    return sk, x, dy


@pytest.mark.parametrize("shape_name", list(SKETCH_SHAPES))
def test_fused_sketch(benchmark, shape_name):
    sk, x, dy = _inputs(SKETCH_SHAPES[shape_name])
    backend = _best_cpu_backend()
    benchmark.group = f"sketch {shape_name}"
    benchmark.extra_info["backend"] = backend
    tag(benchmark, "candidate", target=1.0)
    out = torch.empty(sk.k_out, sk.k_in)
    benchmark(lambda: sk(x, dy, out=out.zero_(), backend=backend))


@pytest.mark.parametrize("shape_name", list(SKETCH_SHAPES))
def test_torch_two_matmul_stored_projection(benchmark, shape_name):
    sk, x, dy = _inputs(SKETCH_SHAPES[shape_name])
    p_in, p_out = sk.projections(torch.device("cpu"))
    benchmark.group = f"sketch {shape_name}"
    tag(benchmark, "baseline")
    benchmark(lambda: (dy @ p_out).T @ (x @ p_in))


def test_materialise_gradient_then_project(benchmark):
    sk, x, dy = _inputs(SKETCH_SHAPES["N4096-d2048"])
    p_in, p_out = sk.projections(torch.device("cpu"))
    benchmark.group = "sketch N4096-d2048 vs materialised G"
    tag(benchmark, "baseline")
    benchmark.pedantic(lambda: p_out.T @ (dy.T @ x) @ p_in, rounds=3, iterations=1, warmup_rounds=1)


def test_fused_sketch_vs_materialised(benchmark):
    sk, x, dy = _inputs(SKETCH_SHAPES["N4096-d2048"])
    backend = _best_cpu_backend()
    benchmark.group = "sketch N4096-d2048 vs materialised G"
    benchmark.extra_info["backend"] = backend
    tag(benchmark, "candidate", target=50.0)
    out = torch.empty(sk.k_out, sk.k_in)
    benchmark(lambda: sk(x, dy, out=out.zero_(), backend=backend))
