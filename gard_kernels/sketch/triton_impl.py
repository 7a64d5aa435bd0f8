"""Fused Triton sketch kernel: S (+)= scale * (dY Sgn_out)^T (X Sgn_in), signs hashed in registers.

One pass over the tokens reads X and dY once each. Per block of BLOCK_N tokens a program
projects X onto k_in sign columns and dY onto k_out sign columns, chunk by chunk over the
features (the sign tile of a chunk is rebuilt from the hash in hashing.py, never loaded), then
adds the outer product of the two projections into a [k_out, k_in] float32 accumulator held in
registers. A persistent grid walks the token blocks, so each program writes one partial.

Partials are combined either by a second, fixed-order reduction kernel (deterministic, the
default: bit-identical results run to run at the cost of one tiny extra launch) or by float32
atomics into `out` (one launch, but the summation order, and so the last bits, vary).

Importing this module never fails: without Triton the kernels stay plain functions and
`is_available()` says False.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple, Optional

import torch

# Absolute: tests load this file on its own (as on a machine without triton), outside the package.
from gard_kernels.sketch.dtypes import ACCEPTED_DTYPES

try:
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a Triton build that cannot load on this machine
    triton = None
    tl = None

# Widest sign tile one program holds; larger k is split over grid axes 1 and 2 (re-reading X or dY).
# 128 spills registers: its [128, 128] float32 accumulator plus the epilogue's pointers exceed 255
# per thread at 8 warps on sm_80/89/90, and 16 warps spill on sm_80 (benchmarks/check_kernels.py).
MAX_BLOCK_K = 64


def _jit(fn=None, **options):
    """triton.jit when Triton is importable; otherwise the plain function, so the module imports."""
    if fn is None:
        return functools.partial(_jit, **options)
    return fn if triton is None else triton.jit(fn, **options)


def is_available() -> bool:
    """Whether Triton is importable here (usability per device is decided in dispatch.py)."""
    return triton is not None


@_jit
def _mix32(x):
    """mix32 of hashing.py on uint32 tensors; uint32 multiplies wrap mod 2^32 as required."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@_jit
def _sign_tile(key, o_r, o_c):
    """Sgn[r, c] = +1 if bit 31 of mix32((mix32(key ^ r) + c) mod 2^32) is 0 else -1, float32.

    key: uint32 scalar; o_r: [BR] row (feature) indices; o_c: [BC] column indices. Returns [BR, BC].
    """
    b_hr = _mix32(key ^ o_r.to(tl.uint32))  # [BR]
    b_h = _mix32(b_hr[:, None] + o_c.to(tl.uint32)[None, :])  # [BR, BC]
    return tl.where(b_h.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)


@_jit
def _project(
    p_a,
    o_n,
    m_n,
    D,
    stride_n,
    stride_d,
    key,
    o_k,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """a[o_n, :] @ Sgn[:, o_k] in float32: [BLOCK_N, BLOCK_K], rows outside m_n are zero."""
    b_p = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_t = p_a + o_n[:, None] * stride_n + o_d[None, :].to(tl.int64) * stride_d
        b_a = tl.load(p_t, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        # +-1 is exact in every input dtype, so 16-bit inputs take the 16-bit tensor-core path.
        # Rows past D meet zeros in b_a, so the sign tile needs no mask.
        b_s = _sign_tile(key, o_d, o_k).to(b_a.dtype)  # [BD, BK]
        b_p = tl.dot(b_a, b_s, b_p, input_precision=PRECISION)
    return b_p


@_jit(do_not_specialize=["key_in", "key_out"])
def _sketch_kernel(
    x,
    dy,
    o,
    key_in,
    key_out,
    scale,
    N,
    D_IN,
    D_OUT,
    K_IN,
    K_OUT,
    stride_xn,
    stride_xd,
    stride_yn,
    stride_yd,
    stride_op,
    stride_om,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KI: tl.constexpr,
    BLOCK_KO: tl.constexpr,
    PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """o[p] (+)= scale * sum_{token blocks b of program p} (dy_b Sgn_out)^T (x_b Sgn_in).

    x: [N, D_IN], dy: [N, D_OUT], one dtype (float32 / float16 / bfloat16), any strides.
    o: float32 [P, K_OUT, K_IN] (stride_op = 0 to address `out` itself). Program (p, j, i) walks
    token blocks p, p + P, ... and owns the tile rows j*BLOCK_KO.. and columns i*BLOCK_KI.. of o.
    ATOMIC adds its tile into o with float32 atomics; otherwise it stores the tile, after adding
    what o held when ACCUMULATE. Keys are uint32 bit patterns passed as int32. Accumulation is
    float32 throughout. Both flags are constexpr so the unused store paths compile away.
    """
    i_p = tl.program_id(0).to(tl.int64)
    i_ko = tl.program_id(1).to(tl.int64)
    i_ki = tl.program_id(2).to(tl.int64)
    n_p = tl.num_programs(0)
    u_in = key_in.to(tl.uint32, bitcast=True)
    u_out = key_out.to(tl.uint32, bitcast=True)

    o_ki = i_ki * BLOCK_KI + tl.arange(0, BLOCK_KI)
    o_ko = i_ko * BLOCK_KO + tl.arange(0, BLOCK_KO)
    b_o = tl.zeros([BLOCK_KO, BLOCK_KI], dtype=tl.float32)
    for i_n in range(i_p, tl.cdiv(N, BLOCK_N), n_p):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_xp = _project(x, o_n, m_n, D_IN, stride_xn, stride_xd, u_in, o_ki, BLOCK_N, BLOCK_D, BLOCK_KI, PRECISION)
        b_dp = _project(dy, o_n, m_n, D_OUT, stride_yn, stride_yd, u_out, o_ko, BLOCK_N, BLOCK_D, BLOCK_KO, PRECISION)
        # Padded sign columns (>= k) only fill rows/columns of b_o that the store masks off.
        b_o = tl.dot(tl.trans(b_dp), b_xp, b_o, input_precision="ieee")  # [BKO, BKI]
    b_o = b_o * scale

    m_o = (o_ko < K_OUT)[:, None] & (o_ki < K_IN)[None, :]
    p_o = o + i_p * stride_op + o_ko[:, None] * stride_om + o_ki[None, :] * stride_ok
    if ATOMIC:
        tl.atomic_add(p_o, b_o, mask=m_o, sem="relaxed")
    else:
        if ACCUMULATE:
            b_o += tl.load(p_o, mask=m_o, other=0.0)
        tl.store(p_o, b_o, mask=m_o)


@_jit
def _sketch_reduce_kernel(
    part,
    o,
    P,
    K_OUT,
    K_IN,
    stride_pp,
    stride_pm,
    stride_pk,
    stride_om,
    stride_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """o (+)= sum_{p < P} part[p], summed in the order p = 0, 1, ... so the result is reproducible.

    part: float32 [P, K_OUT, K_IN]; o: float32 [K_OUT, K_IN]. Without ACCUMULATE o is not read.
    """
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_o = (o_m < K_OUT)[:, None] & (o_k < K_IN)[None, :]
    p_part = part + o_m[:, None] * stride_pm + o_k[None, :] * stride_pk
    b_o = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for i_p in range(0, P):
        b_o += tl.load(p_part + i_p * stride_pp, mask=m_o, other=0.0)  # [BM, BK]
    p_o = o + o_m[:, None] * stride_om + o_k[None, :] * stride_ok
    if ACCUMULATE:
        b_o += tl.load(p_o, mask=m_o, other=0.0)
    tl.store(p_o, b_o, mask=m_o)


@_jit(do_not_specialize=["key"])
def _split_project_kernel(
    a,
    part,
    key,
    N,
    D,
    K,
    stride_n,
    stride_d,
    stride_ps,
    stride_pn,
    d_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Phase 1 of the split sketch: part[s, n, :K] = a[n, features of split s] @ Sgn[those, :K].

    Program (i, s) projects token block i over features [s * d_per_split, (s + 1) * d_per_split):
    splitting the features gives every SM work when there are few token blocks, while the
    BLOCK_N tokens of a block share each hashed sign tile. a: [N, D]; part: float32 [S, N, >= K].
    Launched once for x (Sgn_in) and once for dy (Sgn_out).
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    u_key = key.to(tl.uint32, bitcast=True)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)
    d_lo = i_s * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, D)
    b_p = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        p_t = a + o_n[:, None] * stride_n + o_d[None, :].to(tl.int64) * stride_d
        b_a = tl.load(p_t, mask=m_n[:, None] & (o_d < d_hi)[None, :], other=0.0)  # [BN, BD]
        b_s = _sign_tile(u_key, o_d, o_k).to(b_a.dtype)  # [BD, BK]; rows past d_hi meet zeros
        b_p = tl.dot(b_a, b_s, b_p, input_precision=PRECISION)
    p_o = part + i_s * stride_ps + o_n[:, None] * stride_pn + o_k[None, :]
    tl.store(p_o, b_p, mask=m_n[:, None] & (o_k < K)[None, :])


@_jit
def _split_outer_kernel(
    part_x,
    part_y,
    o,
    scale,
    N,
    S_IN,
    S_OUT,
    K_IN,
    K_OUT,
    stride_xs,
    stride_xn,
    stride_ys,
    stride_yn,
    stride_op,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_KI: tl.constexpr,
    BLOCK_KO: tl.constexpr,
):
    """Phase 2: o[p] = scale * sum over token blocks p, p + P, ... of (dy Sgn_out)^T (x Sgn_in),
    each projection the fixed-order sum of its feature splits from phase 1 (part_x [S_IN, N, >= K_IN],
    part_y [S_OUT, N, >= K_OUT]). o: float32 [P, K_OUT, K_IN]."""
    i_p = tl.program_id(0).to(tl.int64)
    n_p = tl.num_programs(0)
    o_ki = tl.arange(0, BLOCK_KI)
    o_ko = tl.arange(0, BLOCK_KO)
    b_o = tl.zeros([BLOCK_KO, BLOCK_KI], dtype=tl.float32)
    for i_n in range(i_p, tl.cdiv(N, BLOCK_N), n_p):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        p_x = part_x + o_n[:, None] * stride_xn + o_ki[None, :]
        p_y = part_y + o_n[:, None] * stride_yn + o_ko[None, :]
        b_x = tl.zeros([BLOCK_N, BLOCK_KI], dtype=tl.float32)
        for i_s in range(0, S_IN):
            b_x += tl.load(p_x + i_s * stride_xs, mask=m_n[:, None] & (o_ki < K_IN)[None, :], other=0.0)
        b_y = tl.zeros([BLOCK_N, BLOCK_KO], dtype=tl.float32)
        for i_s in range(0, S_OUT):
            b_y += tl.load(p_y + i_s * stride_ys, mask=m_n[:, None] & (o_ko < K_OUT)[None, :], other=0.0)
        b_o = tl.dot(tl.trans(b_y), b_x, b_o, input_precision="ieee")  # [BKO, BKI]
    b_o = b_o * scale
    m_o = (o_ko < K_OUT)[:, None] & (o_ki < K_IN)[None, :]
    tl.store(o + i_p * stride_op + o_ko[:, None] * stride_om + o_ki[None, :], b_o, mask=m_o)


@_jit(do_not_specialize=["key"])
def _projection_kernel(p, key, scale, D, K, stride_d, stride_k, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """p[r, c] = scale * Sgn(key, r, c) through the sketch kernel's hash; for hash-equality tests.

    p: float32 [D, K]; key: uint32 bit pattern passed as int32.
    """
    i_d = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    b_p = _sign_tile(key.to(tl.uint32, bitcast=True), o_d, o_k) * scale  # [BD, BK]
    m_p = (o_d < D)[:, None] & (o_k < K)[None, :]
    tl.store(p + o_d[:, None] * stride_d + o_k[None, :] * stride_k, b_p, mask=m_p)


def _as_int32(key: int) -> int:
    """A uint32 key as the int32 with the same bits: one kernel signature for every key."""
    if not 0 <= key <= 0xFFFFFFFF:
        raise ValueError(f"stream keys are uint32, got {key}")
    return key - (1 << 32) if key >= (1 << 31) else key


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"the Triton sketch runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 set before "
        f"triton is imported; got a {device.type} tensor"
    )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    """SMs of a CUDA device (the current one when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def sign_tile_width(k: int) -> int:
    """Sign-tile width for k columns: a power of two >= 16 (tl.dot's minimum), at most MAX_BLOCK_K."""
    return min(max(16, 1 << max(k - 1, 0).bit_length()), MAX_BLOCK_K)


# Every width sign_tile_width returns: the sign tiles a launch can use.
SIGN_TILE_WIDTHS = tuple(sorted({sign_tile_width(k) for k in range(1, MAX_BLOCK_K + 1)}))


class LaunchPlan(NamedTuple):
    """What the launch heuristic picks for one kernel of sketch_triton.

    Attributes:
        block_n: tokens per block.
        block_d: features per chunk (None: the kernel has no feature axis, "split_outer").
        programs: programs along tokens ("sketch", "split_outer") or feature splits per side
            ("split_project"), before the caller's overrides.
        num_warps: warps per program.
    """

    block_n: int
    block_d: Optional[int]
    programs: int
    num_warps: int


def launch_plan(
    kernel: str, n: int, dtype: torch.dtype, block_ki: int, block_ko: Optional[int] = None, *,
    d: Optional[int] = None, sms: Optional[int] = None,
) -> LaunchPlan:
    """The launch shape sketch_triton's heuristics give one of its kernels (no GPU needed).

    Args:
        kernel: "sketch" (the fused _sketch_kernel), "split_project" (phase 1 of the split
            algorithm, one side) or "split_outer" (its phase 2).
        n: tokens. dtype: the inputs' dtype (one of ACCEPTED_DTYPES).
        block_ki, block_ko: sign-tile widths (sign_tile_width); "split_project" takes its side's
            width as block_ki; block_ko defaults to block_ki.
        d: features of the side ("split_project" only).
        sms: streaming multiprocessors of the GPU; None: not a GPU (Triton's interpreter).
    """
    block_ko = block_ki if block_ko is None else block_ko
    if kernel == "sketch":
        return _fused_plan(n, dtype, max(block_ki, block_ko), sms)
    if kernel == "split_project":
        if d is None:
            raise ValueError("launch_plan('split_project', ...) needs the side's feature count d")
        return _split_plan(n, d, dtype, block_ki, sms)
    if kernel == "split_outer":
        block_n, num_warps = _outer_config(block_ki, block_ko)
        slots = 2 * sms if sms is not None else 4
        return LaunchPlan(block_n, None, max(1, min(slots, _cdiv(n, block_n))), num_warps)
    raise ValueError(f"kernel must be 'sketch', 'split_project' or 'split_outer', got {kernel!r}")


def _device_sms(device: torch.device) -> Optional[int]:
    """SMs of a CUDA device; None elsewhere (the interpreter)."""
    return _sms(device) if device.type == "cuda" else None


def _fused_plan(n: int, dtype: torch.dtype, block_k: int, sms: Optional[int]) -> LaunchPlan:
    """BLOCK_N, BLOCK_D, programs along tokens and num_warps of the fused kernel's persistent grid.

    Heuristic rather than autotune: the choice must be cheap on the first call and keep
    interpreter runs quick. BLOCK_N = 64 amortises the per-chunk hash over 64 tokens; it shrinks
    (to 32 at most) when there are too few token blocks for half the SMs. Wide sign tiles get
    more warps.
    float32 inputs take the FMA dot (input_precision="ieee"), which holds each thread's operand
    rows and columns in registers: 16-feature chunks, 8 warps and 32 tokens at 64 sign columns
    keep it from spilling on sm_80/89/90 (checked for every variant by benchmarks/check_kernels.py).
    """
    if dtype == torch.float32:
        block_d, num_warps, block_n = 16, 8, (64 if block_k <= 32 else 32)
    else:
        # 128-feature chunks keep more bytes in flight: on an H200 (bf16, 16 sign columns) they ran
        # 1.2-1.5x faster than 64 (docs/benchmarks.md, "Measured on an H200").
        block_d, num_warps, block_n = (128 if block_k <= 32 else 64), (4 if block_k <= 32 else 8), 64
    if sms is None:
        # The interpreter runs programs one after another: few programs, still several blocks each.
        return LaunchPlan(block_n, block_d, min(_cdiv(n, block_n), 4), num_warps)
    # Halve the token block only while fewer than half the SMs would get one: measured on an H200,
    # N = 8192 ran in 56 us with 64-token blocks (128 blocks, 132 SMs) and in 69-80 us with 32.
    while block_n > 32 and _cdiv(n, block_n) < sms // 2:
        block_n //= 2
    if dtype != torch.float32 and block_k >= 64 and block_n == 32:
        # ptxas caps this shape at 128 registers and spills 8 bytes with 64-feature chunks.
        block_d = 32
    # Several programs per SM hide load latency; fewer when each holds a wide accumulator.
    per_sm = 4 if block_k <= 32 else 2
    return LaunchPlan(block_n, block_d, min(_cdiv(n, block_n), per_sm * sms), num_warps)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sketch_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    key_in: int,
    key_out: int,
    k_in: int,
    k_out: int,
    scale: float,
    out: torch.Tensor,
    accumulate: bool,
    *,
    deterministic: bool = True,
    algorithm: str | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    block_k: int | None = None,
    num_programs: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in), signs hashed in-kernel from the stream keys.

    Args:
        x: [N, d_in] float32 / float16 / bfloat16, any strides, on CUDA (or CPU when interpreting).
        dy: [N, d_out], same dtype and device as x.
        key_in: uint32 stream key of Sgn_in (hashing.stream_key).
        key_out: uint32 stream key of Sgn_out.
        k_in: sketch columns (input side).
        k_out: sketch rows (output side).
        scale: multiplies the +-1 sums, 1/sqrt(k_in * k_out) for GradientSketch.
        out: [k_out, k_in] float32 on x's device, updated in place.
        accumulate: add into out (True) or overwrite it without reading it (False).
        deterministic: combine per-program partials with a fixed-order second kernel, so equal
            inputs give bit-identical results on one device (default True; the launch heuristic
            depends only on N, dtype, k and the SM count); False adds them with
            float32 atomics (one launch fewer, last bits vary between runs).
        algorithm: "fused" (one pass: each program projects its token blocks over all features
            and adds their outer product) or "split" (features split over programs too: phase 1
            writes partial projections, phase 2 sums them and forms the outer products; for
            k_in, k_out <= 64, and always deterministic). None: "fused".
        block_n, block_d, block_k, num_programs, splits, num_warps: override the launch heuristic
            (tests, tuning); block sizes must be powers of two >= 16, block_k applies to "fused",
            splits (feature splits per side, at most) to "split". The result does not depend on
            them beyond float32 rounding.
    Returns:
        out.
    """
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(
            f"sketch_triton expects x [N, d_in] and dy [N, d_out], got {tuple(x.shape)} and {tuple(dy.shape)}"
        )
    if x.dtype != dy.dtype or x.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"x and dy need one dtype among {ACCEPTED_DTYPES}, got {x.dtype} and {dy.dtype}")
    if out.shape != (k_out, k_in) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [{k_out}, {k_in}], got {out.dtype} {tuple(out.shape)}")
    if not (x.device == dy.device == out.device):
        raise ValueError(f"x, dy and out must share a device, got {x.device}, {dy.device}, {out.device}")
    if not is_available():
        raise RuntimeError("the Triton sketch backend needs triton, which is not importable here")
    _check_device(x.device)
    n, d_in = x.shape
    d_out = dy.shape[1]
    if n == 0:
        return out if accumulate else out.zero_()

    for name, value in (("block_n", block_n), ("block_d", block_d), ("block_k", block_k)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
    algorithm = algorithm or "fused"
    if algorithm not in ("fused", "split"):
        raise ValueError(f"algorithm must be 'fused' or 'split', got {algorithm!r}")
    if algorithm == "split":
        if max(k_in, k_out) > MAX_BLOCK_K:
            raise ValueError(
                f"the split sketch takes k_in, k_out <= {MAX_BLOCK_K}, got {k_in}, {k_out}; use algorithm='fused'"
            )
        return _sketch_split(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate,
                             block_n, block_d, splits, num_programs, num_warps)
    bk = block_k or MAX_BLOCK_K
    bki, bko = min(sign_tile_width(k_in), bk), min(sign_tile_width(k_out), bk)
    plan = launch_plan("sketch", n, x.dtype, bki, bko, sms=_device_sms(x.device))
    bn, bd, num_warps = block_n or plan.block_n, block_d or plan.block_d, num_warps or plan.num_warps
    n_prog = max(1, min(num_programs or plan.programs, triton.cdiv(n, bn)))
    grid = (n_prog, triton.cdiv(k_out, bko), triton.cdiv(k_in, bki))
    # fp32 inputs need full-precision products (tf32 would miss the 1e-5 target); 16-bit inputs
    # multiply exactly by +-1 on the default tensor-core path.
    precision = "ieee" if x.dtype == torch.float32 else None

    if n_prog == 1:
        # One program per tile: it owns its part of out outright, so store (or add) directly.
        target, stride_p, atomic, kernel_acc = out, 0, False, accumulate
    elif deterministic:
        target = torch.empty(n_prog, k_out, k_in, dtype=torch.float32, device=x.device)
        stride_p, atomic, kernel_acc = target.stride(0), False, False
    else:
        target, stride_p, atomic, kernel_acc = out, 0, True, False
        if not accumulate:
            out.zero_()
    stride_om, stride_ok = target.stride(-2), target.stride(-1)

    with _device_guard(x.device):
        _sketch_kernel[grid](
            x,
            dy,
            target,
            _as_int32(key_in),
            _as_int32(key_out),
            float(scale),
            n,
            d_in,
            d_out,
            k_in,
            k_out,
            x.stride(0),
            x.stride(1),
            dy.stride(0),
            dy.stride(1),
            stride_p,
            stride_om,
            stride_ok,
            BLOCK_N=bn,
            BLOCK_D=bd,
            BLOCK_KI=bki,
            BLOCK_KO=bko,
            PRECISION=precision,
            ATOMIC=atomic,
            ACCUMULATE=kernel_acc,
            num_warps=num_warps,
        )
        if target is not out and not atomic:
            _reduce_partials(target, out, accumulate)
    return out


def _reduce_partials(partials: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= partials.sum(0) in a fixed order (the deterministic second kernel)."""
    n_prog, k_out, k_in = partials.shape
    bm, bk = min(sign_tile_width(k_out), 32), min(sign_tile_width(k_in), 32)
    _sketch_reduce_kernel[(triton.cdiv(k_out, bm), triton.cdiv(k_in, bk))](
        partials,
        out,
        n_prog,
        k_out,
        k_in,
        partials.stride(0),
        partials.stride(1),
        partials.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=bm,
        BLOCK_K=bk,
        ACCUMULATE=accumulate,
    )


def _split_plan(n: int, d: int, dtype: torch.dtype, block_k: int, sms: Optional[int]) -> LaunchPlan:
    """BLOCK_N, BLOCK_D, feature splits and num_warps of the split sketch's phase 1 for one side.

    Wide token blocks share each hashed sign tile among more tokens (the hash costs about as much
    as the loads at BLOCK_N = 32); the features are split until there is about one program per
    SM, each still walking at least four feature chunks (measured on an H200 at N = 8192,
    d = 4096, bf16: 2 to 4 splits of 128-feature chunks ran in 53-55 us, 16 splits in 72-82).
    float32 keeps the fused kernel's register-safe FMA shape (16-feature chunks, 8 warps).
    """
    if dtype == torch.float32:
        block_d, num_warps, block_n = 16, 8, (64 if block_k <= 32 else 32)
    else:
        # 64 tokens x 128 features at 8 warps: 128 tokens spill on sm_89 with 128 features, and 4
        # warps need 242-255 registers per thread with 64 (measured alike on the H200: 53 us).
        block_d, num_warps, block_n = (128 if block_k <= 32 else 64), 8, 64
    slots = sms if sms is not None else 4
    blocks = _cdiv(n, block_n)
    splits = max(1, min(_cdiv(slots, blocks), _cdiv(d, 4 * block_d)))
    return LaunchPlan(block_n, block_d, splits, num_warps)


def _outer_config(block_ki: int, block_ko: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the split sketch's phase 2 that compile without spills on sm_80/89/90
    (benchmarks/check_kernels.py): 8 warps once a 64-wide tile is involved, 32 tokens and 16 warps
    when both are."""
    if max(block_ki, block_ko) < 64:
        return 64, 4
    return (32, 16) if min(block_ki, block_ko) >= 64 else (64, 8)


def _sketch_split(
    x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate, block_n, block_d, splits, num_programs, num_warps
):
    """The split algorithm of sketch_triton (arguments checked there): two phase-1 launches (x and
    dy), the outer products over token blocks, then the fixed-order reduction into out."""
    n = x.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else None
    parts = []
    for a, key, k in ((x, key_in, k_in), (dy, key_out, k_out)):
        d = a.shape[1]
        bk = sign_tile_width(k)
        plan = launch_plan("split_project", n, a.dtype, bk, d=d, sms=_device_sms(a.device))
        bn, bd, warps = block_n or plan.block_n, block_d or plan.block_d, plan.num_warps
        n_split = max(1, min(splits or plan.programs, triton.cdiv(d, bd)))
        # Whole chunks per split, so a chunk never straddles two programs.
        per_split = triton.cdiv(triton.cdiv(d, n_split), bd) * bd
        n_split = triton.cdiv(d, per_split)
        part = torch.empty(n_split, n, bk, dtype=torch.float32, device=a.device)
        with _device_guard(a.device):
            _split_project_kernel[(triton.cdiv(n, bn), n_split)](
                a, part, _as_int32(key), n, d, k, a.stride(0), a.stride(1), part.stride(0), part.stride(1),
                per_split,
                BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk, PRECISION=precision, num_warps=num_warps or warps,
            )
        parts.append(part)
    part_x, part_y = parts
    outer = launch_plan("split_outer", n, x.dtype, part_x.shape[2], part_y.shape[2], sms=_device_sms(x.device))
    bn2, warps2 = outer.block_n, outer.num_warps
    n_prog = max(1, min(num_programs or outer.programs, triton.cdiv(n, bn2)))
    partials = torch.empty(n_prog, k_out, k_in, dtype=torch.float32, device=x.device)
    with _device_guard(x.device):
        _split_outer_kernel[(n_prog,)](
            part_x, part_y, partials, float(scale), n, part_x.shape[0], part_y.shape[0], k_in, k_out,
            part_x.stride(0), part_x.stride(1), part_y.stride(0), part_y.stride(1),
            partials.stride(0), partials.stride(1),
            BLOCK_N=bn2, BLOCK_KI=part_x.shape[2], BLOCK_KO=part_y.shape[2], num_warps=warps2,
        )
        _reduce_partials(partials, out, accumulate)
    return out


def projection_triton(key: int, d: int, k: int, device: torch.device | str = "cuda") -> torch.Tensor:
    """P [d, k] float32 with entries +-1/sqrt(k), from the in-kernel hash (tests compare it with
    hashing.projection_matrix bit for bit).

    Args:
        key: uint32 stream key.
        d: rows (features).
        k: columns.
        device: CUDA device, or "cpu" under TRITON_INTERPRET=1.
    """
    if d <= 0 or k <= 0:
        raise ValueError(f"projection needs d > 0 and k > 0, got d={d}, k={k}")
    if not is_available():
        raise RuntimeError("projection_triton needs triton, which is not importable here")
    device = torch.device(device)
    _check_device(device)
    p = torch.empty(d, k, dtype=torch.float32, device=device)
    # 32 columns: a [64, 64] float32 tile spills 8 bytes on sm_80.
    bd, bk = 64, min(sign_tile_width(k), 32)
    # Rounded from float64 once, as projection_matrix rounds +-1/sqrt(k): the products match exactly.
    scale = 1.0 / math.sqrt(k)
    with _device_guard(device):
        _projection_kernel[(triton.cdiv(d, bd), triton.cdiv(k, bk))](
            p, _as_int32(key), scale, d, k, p.stride(0), p.stride(1), BLOCK_D=bd, BLOCK_K=bk
        )
    return p


def _device_guard(device: torch.device):
    """Make `device` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
