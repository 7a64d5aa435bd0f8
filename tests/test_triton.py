"""The fused Triton sketch kernel and its in-kernel hash, against the float64 oracle.

On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 and these run on the CPU through
Triton's interpreter (which has no bfloat16), with small shapes to stay quick.
"""
import importlib.util
import sys

import pytest
import torch

import gard_kernels as gk
from gard_kernels import reference
from gard_kernels.sketch import hashing, triton_impl
from gard_kernels.sketch.triton_impl import projection_triton, sketch_triton

from .util import SKETCH_TOLERANCE, poisoned, rel_error

pytestmark = pytest.mark.skipif(not triton_impl.is_available(), reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter has no bfloat16"),
    ),
]
SHAPES = [  # (N, d_in, d_out, k_in, k_out)
    (123, 77, 45, 16, 16),
    (1, 77, 45, 5, 24),
    (70, 20, 33, 24, 5),
    # k above the widest sign tile (64): the launcher splits the columns over grid tiles
    (40, 19, 21, 100, 65),
]


def _inputs(n, d_in, d_out, dtype=torch.float32):
    return torch.randn(n, d_in, device=DEVICE).to(dtype), torch.randn(n, d_out, device=DEVICE).to(dtype)


def _expected(sk, x, dy):
    return reference.sketch(x.cpu(), dy.cpu(), sk.p_in, sk.p_out)


def _direct(sk, x, dy, out, accumulate, **launch):
    return sketch_triton(x, dy, sk.key_in, sk.key_out, sk.k_in, sk.k_out, sk.scale, out, accumulate, **launch)


def test_triton_listed_as_a_backend():
    assert "triton" in gk.available_backends(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, shape):
    n, d_in, d_out, k_in, k_out = shape
    sk = gk.GradientSketch(d_in, d_out, k_in, k_out, seed=11)
    x, dy = _inputs(n, d_in, d_out, dtype)
    expected = _expected(sk, x, dy)
    got = sk(x, dy, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (k_out, k_in)
    assert rel_error(got, expected) < SKETCH_TOLERANCE[dtype]
    direct = _direct(sk, x, dy, poisoned((k_out, k_in), DEVICE), accumulate=False)
    assert rel_error(direct, expected) < SKETCH_TOLERANCE[dtype]


def test_three_d_and_non_contiguous_inputs():
    sk = gk.GradientSketch(45, 77, 16, 8, seed=5)
    x3, dy3 = torch.randn(3, 21, 45, device=DEVICE), torch.randn(3, 21, 77, device=DEVICE)
    assert rel_error(sk(x3, dy3, backend="triton"), _expected(sk, x3, dy3)) < 1e-5
    # Transposed storage (feature stride != 1) reaches the kernel as is, without a copy.
    xt, dyt = torch.randn(45, 50, device=DEVICE).T, torch.randn(77, 50, device=DEVICE).T
    assert not xt.is_contiguous() and xt.stride(1) != 1
    got = _direct(sk, xt, dyt, poisoned((8, 16), DEVICE), accumulate=False)
    assert rel_error(got, _expected(sk, xt, dyt)) < 1e-5
    # A strided token dimension (every other row).
    xs, dys = torch.randn(100, 45, device=DEVICE)[::2], torch.randn(100, 77, device=DEVICE)[::2]
    got = _direct(sk, xs, dys, poisoned((8, 16), DEVICE), accumulate=False)
    assert rel_error(got, _expected(sk, xs, dys)) < 1e-5


@pytest.mark.parametrize("deterministic", [True, False])
def test_accumulate_adds_into_out(deterministic):
    sk = gk.GradientSketch(20, 30, 6, 5, seed=1)
    x, dy = _inputs(150, 20, 30)
    out = torch.full((5, 6), 2.0, device=DEVICE)
    # block_n=16 with 3 programs: each program walks several token blocks and leaves a partial.
    returned = _direct(sk, x, dy, out, True, deterministic=deterministic, block_n=16, num_programs=3)
    assert returned is out
    assert rel_error(out, 2.0 + _expected(sk, x, dy)) < 1e-5
    # The GradientSketch path accumulates as well when given out.
    sk(x, dy, out=out, backend="triton")
    assert rel_error(out, 2.0 + 2 * _expected(sk, x, dy)) < 1e-5


@pytest.mark.parametrize("deterministic", [True, False])
def test_several_token_blocks_overwrite_poisoned_out(deterministic):
    sk = gk.GradientSketch(40, 24, 16, 16, seed=9)
    x, dy = _inputs(200, 40, 24)
    got = _direct(sk, x, dy, poisoned((16, 16), DEVICE), False, deterministic=deterministic, block_n=16, num_programs=4)
    assert rel_error(got, _expected(sk, x, dy)) < 1e-5


def test_deterministic_mode_is_bit_reproducible():
    sk = gk.GradientSketch(40, 24, 16, 8, seed=4)
    x, dy = _inputs(200, 40, 24)
    launch = dict(deterministic=True, block_n=16, num_programs=5)
    first = _direct(sk, x, dy, poisoned((8, 16), DEVICE), False, **launch)
    second = _direct(sk, x, dy, poisoned((8, 16), DEVICE), False, **launch)
    assert torch.equal(first, second)


def test_independent_of_launch_configuration():
    # k_in = 24 with block_k=16 splits the sign columns over two grid tiles.
    sk = gk.GradientSketch(50, 37, 24, 5, seed=3)
    x, dy = _inputs(90, 50, 37)
    default = _direct(sk, x, dy, poisoned((5, 24), DEVICE), False)
    small = _direct(sk, x, dy, poisoned((5, 24), DEVICE), False, block_n=16, block_d=16, block_k=16, num_programs=2)
    assert rel_error(small, default) < SKETCH_TOLERANCE[torch.float32]
    assert rel_error(default, _expected(sk, x, dy)) < SKETCH_TOLERANCE[torch.float32]


@pytest.mark.parametrize("key", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, hashing.stream_key(7, hashing.SIDE_OUT)])
@pytest.mark.parametrize("d, k", [(1, 1), (77, 5), (130, 24), (33, 70)])
def test_projection_hash_matches_hashing_module(key, d, k):
    got = projection_triton(key, d, k, DEVICE).cpu()
    assert torch.equal(got, hashing.projection_matrix(key, d, k))


def test_zero_tokens_and_bad_arguments():
    sk = gk.GradientSketch(8, 6, 4, 4)
    x0, dy0 = _inputs(0, 8, 6)
    empty = _direct(sk, x0, dy0, poisoned((4, 4), DEVICE), False)
    assert torch.equal(empty.cpu(), torch.zeros(4, 4))
    x, dy = _inputs(5, 8, 6)
    with pytest.raises(TypeError):
        _direct(sk, x, dy.half(), poisoned((4, 4), DEVICE), False)
    with pytest.raises(ValueError):
        _direct(sk, x, dy, poisoned((4, 5), DEVICE), False)
    with pytest.raises(ValueError):
        _direct(sk, x, dy, poisoned((4, 4), DEVICE), False, block_n=24)


def test_module_imports_without_triton(monkeypatch):
    # None in sys.modules makes `import triton` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_impl_without_triton", triton_impl.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.is_available() is False
    with pytest.raises(RuntimeError):
        module.sketch_triton(
            torch.randn(2, 3), torch.randn(2, 4), 0, 1, 4, 4, 1.0, torch.empty(4, 4), accumulate=False
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(123, 77, 45, 16, 16), (1, 77, 45, 5, 24), (70, 20, 33, 24, 5), (300, 130, 9, 64, 33)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_split_algorithm_matches_reference(dtype, shape, accumulate):
    n, d_in, d_out, k_in, k_out = shape
    sk = gk.GradientSketch(d_in, d_out, k_in, k_out, seed=11)
    x, dy = _inputs(n, d_in, d_out, dtype)
    start = torch.randn(k_out, k_in, device=DEVICE)
    out = start.clone() if accumulate else poisoned((k_out, k_in), DEVICE)
    got = _direct(sk, x, dy, out, accumulate, algorithm="split")
    expected = _expected(sk, x, dy) + (start.cpu().double() if accumulate else 0)
    assert rel_error(got, expected) < SKETCH_TOLERANCE[dtype]


def test_split_algorithm_is_independent_of_its_launch_configuration():
    # Several splits per side (uneven: 130 features in chunks of 16), several phase-2 programs.
    sk = gk.GradientSketch(130, 50, 24, 16, seed=2)
    x, dy = _inputs(150, 130, 50)
    expected = _expected(sk, x, dy)
    for launch in (dict(splits=1), dict(splits=3, block_d=16, block_n=16, num_programs=3), dict(splits=9, block_d=16)):
        got = _direct(sk, x, dy, poisoned((16, 24), DEVICE), False, algorithm="split", **launch)
        assert rel_error(got, expected) < SKETCH_TOLERANCE[torch.float32], launch
    first = _direct(sk, x, dy, poisoned((16, 24), DEVICE), False, algorithm="split", splits=3)
    assert torch.equal(first, _direct(sk, x, dy, poisoned((16, 24), DEVICE), False, algorithm="split", splits=3))


def test_split_algorithm_refuses_wide_sketches_and_unknown_names():
    sk = gk.GradientSketch(20, 20, 65, 4, seed=0)
    x, dy = _inputs(8, 20, 20)
    with pytest.raises(ValueError, match="k_in, k_out <= 64"):
        _direct(sk, x, dy, torch.zeros(4, 65, device=DEVICE), False, algorithm="split")
    with pytest.raises(ValueError, match="algorithm must be 'fused' or 'split'"):
        _direct(sk, x, dy, torch.zeros(4, 65, device=DEVICE), False, algorithm="tiled")
