"""GradientSketch API, the torch backend and the hash, against the float64 oracle."""
import numpy as np
import pytest
import torch

import gard_kernels as gk
from gard_kernels import reference
from gard_kernels.sketch import hashing
from gard_kernels.sketch.torch_impl import sketch_torch

from .util import SKETCH_TOLERANCE, poisoned, rel_error

SHAPES = [  # (N, d_in, d_out, k_in, k_out)
    (123, 77, 45, 16, 16),
    (1, 5, 3, 4, 7),
    (300, 64, 96, 24, 5),
    (9000, 33, 17, 8, 8),  # spans several token chunks of the torch path
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", list(SKETCH_TOLERANCE))
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, dtype, shape):
    n, d_in, d_out, k_in, k_out = shape
    sk = gk.GradientSketch(d_in, d_out, k_in, k_out, seed=11)
    x = torch.randn(n, d_in).to(dtype)
    dy = torch.randn(n, d_out).to(dtype)
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    got = sk(x, dy, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (k_out, k_in)
    assert rel_error(got, expected) < SKETCH_TOLERANCE[dtype]


def test_torch_path_overwrites_poisoned_output():
    sk = gk.GradientSketch(77, 45, 16, 16, seed=2)
    x, dy = torch.randn(9000, 77), torch.randn(9000, 45)
    p_in, p_out = sk.projections(torch.device("cpu"))
    out = sketch_torch(x, dy, p_in, p_out, poisoned((16, 16)), accumulate=False)
    assert rel_error(out, reference.sketch(x, dy, sk.p_in, sk.p_out)) < 1e-5


def test_three_d_and_non_contiguous_inputs():
    sk = gk.GradientSketch(45, 77, 16, 8, seed=5)
    x3 = torch.randn(4, 31, 45)
    dy3 = torch.randn(4, 31, 77)
    expected = reference.sketch(x3, dy3, sk.p_in, sk.p_out)
    assert rel_error(sk(x3, dy3, backend="torch"), expected) < 1e-5
    # Transposed storage: last-dim stride != 1, and a [seq, batch] view that cannot be flattened.
    xt = torch.randn(45, 124).T
    dyt = torch.randn(77, 124).T
    assert not xt.is_contiguous()
    assert rel_error(sk(xt, dyt, backend="torch"), reference.sketch(xt, dyt, sk.p_in, sk.p_out)) < 1e-5
    xs = torch.randn(31, 4, 45).transpose(0, 1)
    dys = torch.randn(31, 4, 77).transpose(0, 1)
    assert rel_error(sk(xs, dys), reference.sketch(xs, dys, sk.p_in, sk.p_out)) < 1e-5


def test_out_accumulates_in_place():
    sk = gk.GradientSketch(20, 30, 6, 5, seed=1)
    x1, dy1, x2, dy2 = torch.randn(17, 20), torch.randn(17, 30), torch.randn(9, 20), torch.randn(9, 30)
    out = torch.full((5, 6), 2.0)
    returned = sk(x1, dy1, out=out)
    sk(x2, dy2, out=out)
    assert returned is out
    expected = 2.0 + reference.sketch(x1, dy1, sk.p_in, sk.p_out) + reference.sketch(
        x2, dy2, sk.p_in, sk.p_out
    )
    assert rel_error(out, expected) < 1e-5


def test_zero_tokens_gives_zeros_and_adds_nothing():
    sk = gk.GradientSketch(8, 6, 4, 4)
    assert torch.equal(sk(torch.empty(0, 8), torch.empty(0, 6)), torch.zeros(4, 4))
    out = torch.ones(4, 4)
    sk(torch.empty(2, 0, 8), torch.empty(2, 0, 6), out=out)
    assert torch.equal(out, torch.ones(4, 4))


@pytest.mark.parametrize(
    "x_shape, dy_shape, message",
    [
        ((10, 7), (10, 6), "expects x"),
        ((10, 8), (11, 6), "leading"),
        ((8,), (6,), "token dimension"),
    ],
)
def test_bad_shapes_raise_clear_errors(x_shape, dy_shape, message):
    sk = gk.GradientSketch(8, 6, 4, 4)
    with pytest.raises(ValueError, match=message):
        sk(torch.randn(x_shape), torch.randn(dy_shape))


def test_bad_arguments_raise_clear_errors():
    sk = gk.GradientSketch(8, 6, 4, 4)
    x, dy = torch.randn(3, 8), torch.randn(3, 6)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        sk(x.double(), dy.double())
    with pytest.raises(ValueError, match="out must be float32"):
        sk(x, dy, out=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="unknown sketch backend"):
        sk(x, dy, backend="numpy")
    for bad in (dict(d_in=0), dict(k_out=-1), dict(seed=-3)):
        args = dict(d_in=8, d_out=6, k_in=4, k_out=4, seed=0) | bad
        with pytest.raises(ValueError):
            gk.GradientSketch(**args)


def test_mixed_input_dtypes_are_computed_in_float32():
    sk = gk.GradientSketch(16, 12, 8, 8, seed=4)
    x, dy = torch.randn(50, 16), torch.randn(50, 12)
    expected = reference.sketch(x.half(), dy.bfloat16(), sk.p_in, sk.p_out)
    assert rel_error(sk(x.half(), dy.bfloat16()), expected) < 1e-5


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """Independent uint32 implementation of the mixer: numpy wraps uint32 products natively."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


@pytest.mark.parametrize("key, d, k", [(0, 5, 3), (hashing.stream_key(7, 1), 1000, 16), (0xFFFFFFFF, 3, 130)])
def test_torch_hash_matches_independent_uint32_implementation(key, d, k):
    rows = np.arange(d, dtype=np.uint32)[:, None]
    cols = np.arange(k, dtype=np.uint32)[None, :]
    with np.errstate(over="ignore"):
        h = _mix32_numpy(_mix32_numpy(np.uint32(key) ^ rows) + cols)
    expected = np.where(h >> np.uint32(31) == 0, 1.0, -1.0) / np.sqrt(k)
    got = hashing.projection_matrix(key, d, k, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(got, expected)


def test_projection_properties():
    sk = gk.GradientSketch(3000, 3000, 16, 16, seed=3)
    p_in, p_out = sk.p_in, sk.p_out
    assert set(p_in.abs().unique().tolist()) == {0.25}
    # Sides are independent streams even for square layers (one shared P biases <S_i, S_j>).
    assert not torch.equal(p_in, p_out)
    assert abs(p_in.mean().item()) < 0.01 and abs((p_in * p_out).mean().item()) < 0.01
    # Columns are nearly orthogonal: P^T P ~ (d/k) I.
    gram = p_in.T @ p_in * 16 / 3000
    assert (gram - torch.eye(16)).abs().max() < 0.1
    # A wider sketch extends a narrower one, and other seeds give other matrices.
    assert torch.equal(gk.GradientSketch(3000, 3000, 32, 16, seed=3).p_in[:, :16].sign(), p_in.sign())
    assert not torch.equal(gk.GradientSketch(3000, 3000, 16, 16, seed=4).p_in, p_in)
    assert hashing.stream_key(1, 0) != hashing.stream_key(1 + 2**32, 0)


def test_sketch_inner_products_are_unbiased():
    """E<S_i, S_j> over projections equals <G_i, G_j>; a shared P_in = P_out would be biased."""
    d, n, trials = 6, 40, 3000
    x1, dy1, x2, dy2 = (torch.randn(n, d, dtype=torch.float64) for _ in range(4))
    # Make tr(G) large so the bias of a shared projection, about (tr G)^2 / k, is visible.
    dy1 = dy1 + 2 * x1
    dy2 = dy2 + 2 * x2
    g1, g2 = dy1.T @ x1, dy2.T @ x2
    truth = (g1 * g2).sum().item()
    independent, shared = [], []
    for seed in range(trials):
        sk = gk.GradientSketch(d, d, 3, 3, seed=seed)
        p_in, p_out = sk.p_in.double(), sk.p_out.double()
        independent.append((p_out.T @ g1 @ p_in * (p_out.T @ g2 @ p_in)).sum().item())
        shared.append((p_in.T @ g1 @ p_in * (p_in.T @ g2 @ p_in)).sum().item())
    independent, shared = np.array(independent), np.array(shared)
    stderr = independent.std(ddof=1) / np.sqrt(trials)
    assert abs(independent.mean() - truth) < 4 * stderr
    shared_stderr = shared.std(ddof=1) / np.sqrt(trials)
    assert abs(shared.mean() - truth) > 6 * shared_stderr


def test_available_backends_and_auto():
    backends = gk.available_backends()
    assert {"reference", "torch"} <= set(backends)
    assert set(backends) <= {"reference", "torch", "cpp", "triton", "cuda"}
    sk = gk.GradientSketch(40, 30, 8, 8, seed=9)
    x, dy = torch.randn(64, 40), torch.randn(64, 30)
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    # auto measures once, then reuses its choice; both calls must be right.
    assert rel_error(sk(x, dy), expected) < 1e-5
    assert rel_error(sk(x, dy), expected) < 1e-5
    with pytest.raises(RuntimeError, match="not usable"):
        sk(x, dy, backend="cuda")
