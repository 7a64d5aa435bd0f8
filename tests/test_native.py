"""Native (csrc) sketch backend against the float64 oracle, and its hash against hashing.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gard_kernels
from gard_kernels import reference
from gard_kernels.sketch import native
from gard_kernels.sketch.hashing import SIDE_IN, SIDE_OUT, projection_matrix, stream_key

from .util import SKETCH_TOLERANCE, poisoned, rel_error

DTYPES = list(SKETCH_TOLERANCE)


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# (N, d_in, d_out, k_in, k_out)
SHAPES = [
    (123, 77, 45, 16, 16),  # odd sizes, partial register blocks
    (1, 77, 45, 16, 16),  # one token
    (123, 77, 45, 5, 24),  # k_in != k_out, neither a multiple of 8
    (123, 77, 45, 24, 5),
    (37, 300, 130, 8, 64),  # k = 8 (12-row register blocks) and a k of several column panels
    (64, 1, 3, 1, 3),  # one feature, one sketch column
    (50, 45, 3000, 17, 33),  # d_out spanning many sign chunks
]


@pytest.fixture(scope="module", autouse=True)
def _native_built():
    # CI has a compiler: a build failure must fail these tests, not skip them.
    assert native.is_available("cpu"), f"the native extension did not build: {native.unavailable_reason('cpu')}"


def _inputs(n, d_in, d_out, dtype, lead=()):
    x = torch.randn(*lead, n, d_in).to(dtype)
    dy = torch.randn(*lead, n, d_out).to(dtype)
    return x, dy


def _check(sk, x, dy):
    """The cpp backend via GradientSketch, and sketch_native on a poisoned out, match the oracle."""
    tol = SKETCH_TOLERANCE[x.dtype]
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    assert rel_error(sk(x, dy, backend="cpp"), expected) < tol

    out = poisoned((sk.k_out, sk.k_in))
    x2, dy2 = x.reshape(-1, sk.d_in), dy.reshape(-1, sk.d_out)
    result = native.sketch_native(x2, dy2, sk.key_in, sk.key_out, sk.k_in, sk.k_out, sk.scale, out, False)
    assert result is out
    assert rel_error(out, expected) < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    n, d_in, d_out, k_in, k_out = shape
    sk = gard_kernels.GradientSketch(d_in, d_out, k_in, k_out, seed=7)
    _check(sk, *_inputs(n, d_in, d_out, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_three_dim_inputs(dtype):
    sk = gard_kernels.GradientSketch(77, 45, 16, 24, seed=1)
    x, dy = _inputs(41, 77, 45, dtype, lead=(3,))
    _check(sk, x, dy)
    # Leading dims that are not contiguous either.
    _check(sk, x.transpose(0, 1), dy.transpose(0, 1))


def _strided_views(n, d_in, d_out, dtype, device="cpu"):
    """(name, x, dy): views whose strides exercise every load path of the kernel."""

    def base(*shape):
        return torch.randn(*shape).to(dtype).to(device)

    return [
        # tokens adjacent in memory (feature stride n): the token-major packing path
        ("transposed", base(d_in, n).T, base(d_out, n).T),
        # feature stride 2
        ("feature-step", base(n, 2 * d_in)[:, ::2], base(n, 3 * d_out)[:, 1::3]),
        # unit feature stride, padded rows, offset start
        ("row-slice", base(2 * n, d_in + 5)[::2, 3 : 3 + d_in], base(n, d_out + 9)[:, 9:]),
        # one token broadcast over all rows (token stride 0)
        ("expanded", base(1, d_in).expand(n, d_in), base(n, d_out)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n", [123, 1000])
def test_non_contiguous_inputs(n, dtype):
    sk = gard_kernels.GradientSketch(77, 45, 16, 5, seed=3)
    for _, x, dy in _strided_views(n, 77, 45, dtype):
        _check(sk, x, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_accumulate_adds_onto_out(dtype):
    sk = gard_kernels.GradientSketch(77, 45, 24, 16, seed=5)
    x, dy = _inputs(123, 77, 45, dtype)
    start = torch.randn(16, 24)
    expected = start.double() + reference.sketch(x, dy, sk.p_in, sk.p_out)
    tol = SKETCH_TOLERANCE[dtype]

    out = start.clone()
    assert sk(x, dy, out=out, backend="cpp") is out
    assert rel_error(out, expected) < tol

    out = start.clone()
    native.sketch_native(x, dy, sk.key_in, sk.key_out, 24, 16, sk.scale, out, True)
    assert rel_error(out, expected) < tol


@pytest.mark.parametrize("threads", [1, 3])
def test_many_token_blocks_and_threads(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sk = gard_kernels.GradientSketch(64, 40, 16, 16, seed=11)
        for dtype in DTYPES:
            _check(sk, *_inputs(5003, 64, 40, dtype))
        # More token blocks than partial sums kept: several blocks per slice.
        sk = gard_kernels.GradientSketch(8, 5, 16, 8, seed=12)
        _check(sk, *_inputs(130001, 8, 5, torch.float32))
    finally:
        torch.set_num_threads(previous)


def test_deterministic():
    sk = gard_kernels.GradientSketch(130, 70, 16, 16, seed=2)
    x, dy = _inputs(3001, 130, 70, torch.float32)
    first = sk(x, dy, backend="cpp")
    assert torch.equal(first, sk(x, dy, backend="cpp"))


def test_zero_tokens():
    x, dy = torch.randn(0, 7), torch.randn(0, 5)
    out = poisoned((3, 4))
    native.sketch_native(x, dy, 1, 2, 4, 3, 1.0, out, False)
    assert torch.equal(out, torch.zeros(3, 4))
    out = torch.ones(3, 4)
    native.sketch_native(x, dy, 1, 2, 4, 3, 1.0, out, True)
    assert torch.equal(out, torch.ones(3, 4))


KEYS = [0, 1, 0xFFFFFFFF, stream_key(0, SIDE_IN), stream_key(2**40 + 7, SIDE_OUT)]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("d, k", [(1, 1), (77, 5), (4096, 16), (3000, 64)])
def test_projection_is_bit_identical(key, d, k):
    assert torch.equal(native.projection_native(key, d, k), projection_matrix(key, d, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("accumulate", [False, True])
def test_opcheck(dtype, accumulate):
    x, dy = _inputs(37, 29, 11, dtype)
    out = torch.zeros(5, 24)
    args = (x, dy, stream_key(3, SIDE_IN), stream_key(3, SIDE_OUT), 24, 5, 0.25, out, accumulate)
    torch.library.opcheck(torch.ops.gard_kernels.sketch.default, args)


def _op(x, dy, k_in=4, k_out=3, out=None, key_in=1, key_out=2):
    out = torch.zeros(k_out, k_in) if out is None else out
    torch.ops.gard_kernels.sketch(x, dy, key_in, key_out, k_in, k_out, 1.0, out, False)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: _op(torch.randn(2, 3, 7), torch.randn(2, 3, 5)), "must be 2-D"),
        (lambda: _op(torch.randn(6, 7), torch.randn(5, 5)), "same number of tokens"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5).half()), "share one dtype"),
        (lambda: _op(torch.randn(6, 7).double(), torch.randn(6, 5).double()), "float32, float16 or bfloat16"),
        (lambda: _op(torch.ones(6, 7, dtype=torch.int32), torch.ones(6, 5, dtype=torch.int32)), "float32, float16"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), out=torch.zeros(4, 3)), r"out must be \[k_out, k_in\]"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), out=torch.zeros(3, 4).double()), "out must be float32"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), out=torch.zeros(4, 3).T), "out must be contiguous"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), k_in=0, out=torch.zeros(3, 0)), "must be positive"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), key_in=-1), "32-bit stream key"),
        (lambda: _op(torch.randn(6, 7), torch.randn(6, 5), key_out=2**32), "32-bit stream key"),
        (lambda: torch.ops.gard_kernels.projection(1, 0, 4), "d and k must be positive"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [(5003, 64, 40, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_reference(shape, dtype):
    assert native.is_available("cuda"), f"the CUDA kernel did not build: {native.unavailable_reason('cuda')}"
    n, d_in, d_out, k_in, k_out = shape
    sk = gard_kernels.GradientSketch(d_in, d_out, k_in, k_out, seed=7)
    x, dy = _inputs(n, d_in, d_out, dtype)
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    tol = SKETCH_TOLERANCE[dtype]
    assert rel_error(sk(x.cuda(), dy.cuda(), backend="cuda"), expected) < tol

    out = poisoned((k_out, k_in), device="cuda")
    native.sketch_native(x.cuda(), dy.cuda(), sk.key_in, sk.key_out, k_in, k_out, sk.scale, out, False)
    assert rel_error(out, expected) < tol
    start = torch.randn(k_out, k_in)
    out = start.cuda()
    native.sketch_native(x.cuda(), dy.cuda(), sk.key_in, sk.key_out, k_in, k_out, sk.scale, out, True)
    assert rel_error(out, start.double() + expected) < tol


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cuda_non_contiguous_and_opcheck(dtype):
    assert native.is_available("cuda"), f"the CUDA kernel did not build: {native.unavailable_reason('cuda')}"
    sk = gard_kernels.GradientSketch(77, 45, 16, 5, seed=3)
    for _, x, dy in _strided_views(1000, 77, 45, dtype, device="cuda"):
        expected = reference.sketch(x.cpu(), dy.cpu(), sk.p_in, sk.p_out)
        assert rel_error(sk(x, dy, backend="cuda"), expected) < SKETCH_TOLERANCE[dtype]
    x, dy = _inputs(37, 29, 11, dtype)
    args = (x.cuda(), dy.cuda(), 5, 6, 24, 5, 0.25, torch.zeros(5, 24, device="cuda"), False)
    torch.library.opcheck(torch.ops.gard_kernels.sketch.default, args)


def test_cpp_listed_as_available():
    assert "cpp" in gard_kernels.available_backends("cpu")


def test_import_does_not_build():
    code = (
        "import gard_kernels\n"
        "from gard_kernels.sketch import native\n"
        "assert native._State.loaded is None, 'importing gard_kernels built the extension'\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """A not-yet-attempted build in a private extensions dir; the real state comes back after."""
    monkeypatch.setattr(native._State, "loaded", None)
    monkeypatch.setattr(native._State, "with_cuda", False)
    monkeypatch.setattr(native._State, "reasons", {})
    monkeypatch.setattr(native._State, "fixes", {})
    monkeypatch.setattr(native._State, "warned", set())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return tmp_path


def _unavailable_warning() -> str:
    with pytest.warns(RuntimeWarning, match="native cpu sketch kernel is unavailable") as record:
        assert not native.is_available("cpu")
    return str(record[0].message)


def _csrc_copy(root: Path) -> Path:
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    for rel in native._CPU_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((csrc / rel).read_bytes())
    return root


def test_warning_names_missing_sources(fresh_build_state, monkeypatch):
    partial = _csrc_copy(fresh_build_state / "partial")
    (partial / "hash.h").unlink()
    monkeypatch.setattr(native, "_csrc_candidates", lambda: (fresh_build_state / "absent", partial))
    message = _unavailable_warning()
    assert "C++ sources are not in this installation" in message
    assert "absent: missing" in message and "lacks hash.h" in message
    assert "gard_kernels/_csrc" in message  # the fix says what a good install holds


def test_warning_names_missing_compiler(fresh_build_state, monkeypatch):
    monkeypatch.setenv("CXX", "gard-no-such-compiler")
    message = _unavailable_warning()
    assert "no C++ compiler: 'gard-no-such-compiler'" in message and "install g++" in message
    assert "sources" not in message and "ninja" not in message


def test_warning_names_missing_ninja(fresh_build_state, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    message = _unavailable_warning()
    assert "ninja is not on PATH" in message and "pip install ninja" in message
    assert "compiler" not in message.split("To fix")[0]


def test_warning_names_build_error(fresh_build_state, monkeypatch):
    broken = _csrc_copy(fresh_build_state / "broken")
    for rel in native._SOURCES:
        # A missing include is fatal at once (an #error would still parse torch's headers).
        path = broken / rel
        path.write_text('#include "gard_test_broken_source.h"\n' + path.read_text())
    monkeypatch.setattr(native, "_csrc_candidates", lambda: (broken, broken))
    message = _unavailable_warning()
    assert "the build failed" in message and "gard_test_broken_source" in message
    assert "compiler output" in message


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


# bf16 inputs are exact in float32 and the signs are +-1, so both CPU paths (vdpbf16ps, and
# conversion to float32) form every product exactly and only round float32 sums: float32's bound.
BF16_EXACT_PRODUCTS_TOLERANCE = 1e-5
BF16_PATHS = [pytest.param(True, id="avx512bf16"), pytest.param(False, id="float-fallback")]


def test_bf16_dot_detected_as_the_cpu_reports():
    assert native.cpu_bf16_dot_supported() == ("avx512_bf16" in _cpu_flags())


def _bf16_path(use_dot: bool):
    if use_dot:
        # Runs (not skips) wherever the CPU has the instructions; elsewhere the test above pins
        # that the fallback is chosen, and the float-fallback cases below cover it.
        if not native.cpu_bf16_dot_supported():
            pytest.skip("this CPU has no AVX-512 BF16")
    return native.cpu_bf16_dot(use_dot)


def _check_bf16(sk, x, dy, start=None):
    expected = reference.sketch(x, dy, sk.p_in, sk.p_out)
    out = poisoned((sk.k_out, sk.k_in)) if start is None else start.clone()
    if start is not None:
        expected = expected + start.double()
    native.sketch_native(x, dy, sk.key_in, sk.key_out, sk.k_in, sk.k_out, sk.scale, out, start is not None)
    assert rel_error(out, expected) < BF16_EXACT_PRODUCTS_TOLERANCE
    return out


@pytest.mark.parametrize("use_dot", BF16_PATHS)
@pytest.mark.parametrize(
    "shape",
    # odd d across chunks and k > 2 panels; rows 4 KiB apart (d = 2048), which take 6-row blocks
    SHAPES + [(301, 4097, 129, 128, 100), (1000, 31, 2049, 48, 16), (1001, 2048, 64, 16, 32)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bf16_paths_match_reference(shape, use_dot):
    n, d_in, d_out, k_in, k_out = shape
    sk = gard_kernels.GradientSketch(d_in, d_out, k_in, k_out, seed=7)
    with _bf16_path(use_dot):
        _check_bf16(sk, *_inputs(n, d_in, d_out, torch.bfloat16))
        _check_bf16(sk, *_inputs(n, d_in, d_out, torch.bfloat16), start=torch.randn(k_out, k_in))


@pytest.mark.parametrize("use_dot", BF16_PATHS)
@pytest.mark.parametrize("n", [123, 1000])
def test_bf16_paths_non_contiguous(n, use_dot):
    sk = gard_kernels.GradientSketch(77, 45, 16, 5, seed=3)
    with _bf16_path(use_dot):
        for _, x, dy in _strided_views(n, 77, 45, torch.bfloat16):
            _check_bf16(sk, x, dy)


@pytest.mark.parametrize("use_dot", BF16_PATHS)
def test_bf16_odd_feature_count_ignores_the_next_column(use_dot):
    # Rows of odd length inside wider rows whose next column is NaN: the odd tail feature must
    # pair with zero, not with its neighbour in memory.
    sk = gard_kernels.GradientSketch(77, 45, 16, 16, seed=4)
    x_wide, dy_wide = torch.randn(130, 78).bfloat16(), torch.randn(130, 46).bfloat16()
    x_wide[:, 77], dy_wide[:, 45] = float("nan"), float("nan")
    with _bf16_path(use_dot):
        _check_bf16(sk, x_wide[:, :77], dy_wide[:, :45])


def test_bf16_dot_path_is_the_one_that_runs():
    if not native.cpu_bf16_dot_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    sk = gard_kernels.GradientSketch(640, 320, 16, 16, seed=8)
    x, dy = _inputs(5003, 640, 320, torch.bfloat16)
    results = {}
    for use_dot in (True, False):
        with native.cpu_bf16_dot(use_dot):
            results[use_dot] = _check_bf16(sk, x, dy)
    # Pairwise products summed in another order: the switch must change the last bits.
    assert not torch.equal(results[True], results[False])
    # The switch is restored on exit.
    assert torch.ops.gard_kernels.set_cpu_bf16_dot(True) is True
