"""The one sign hash behind every projection matrix (docs/sketch.md, "The hash").

P[row, col] = (+1 if bit 31 of h(key, row, col) is 0 else -1) / sqrt(k), with

    h(key, row, col) = mix32((mix32(key ^ row) + col) mod 2^32)
    mix32(x): x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15   (mod 2^32)

The same arithmetic is written in csrc/hash.h (C++ and CUDA) and in the Triton kernel; tests check
that all of them produce bit-identical matrices. Both multipliers are below 2^31, so the torch
version can run in int64 without overflow (x < 2^32, c < 2^31, x*c < 2^63).

Column-major salting (`+ col` after mixing the row) means the first k columns of a projection with
k' > k columns equal the projection with k columns: a larger sketch extends a smaller one.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
# Salts that separate the two sides of one sketch (P_in, P_out) into independent streams.
SIDE_IN = 0
SIDE_OUT = 1


def mix32(x: int) -> int:
    """Python-integer version of the 32-bit mixer (used on the host for stream keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 15
    return x


def stream_key(seed: int, side: int) -> int:
    """32-bit key of one projection stream, from a user seed (any int >= 0) and a side salt."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    key = mix32(side + 0x5EED)
    # Fold every 32-bit word of the seed in, so seeds that differ only in high bits still differ.
    while True:
        key = mix32(key ^ (seed & MASK32))
        seed >>= 32
        if seed == 0:
            return key


def _mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    x = x ^ (x >> 15)
    return x


def sign_bits(key: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bit 31 of h(key, row, col) for broadcastable int64 tensors of rows and cols (0 or 1)."""
    h_row = _mix32_tensor((rows ^ key) & MASK32)
    h = _mix32_tensor((h_row + cols) & MASK32)
    return h >> 31


def projection_matrix(
    key: int, d: int, k: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Materialise P [d, k] with entries +-1/sqrt(k) for a stream key. Tests and fallbacks only."""
    if d <= 0 or k <= 0:
        raise ValueError(f"projection needs d > 0 and k > 0, got d={d}, k={k}")
    rows = torch.arange(d, device=device, dtype=torch.int64)[:, None]
    cols = torch.arange(k, device=device, dtype=torch.int64)[None, :]
    signs = 1.0 - 2.0 * sign_bits(key, rows, cols).to(torch.float64)
    return (signs / math.sqrt(k)).to(dtype)
