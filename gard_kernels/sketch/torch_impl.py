"""Pure-torch sketch backend: any device, the fallback when no fused kernel is usable.

Unlike the fused kernels it materialises P_in and P_out (cached per device by GradientSketch)
and runs two matmuls, upcasting token chunks to float32 so low-precision inputs accumulate in
float32 without copying the whole activation at once.
"""
from __future__ import annotations

import torch

# Tokens per chunk: bounds the float32 copy of a low-precision input to about 16 MiB at d = 1024.
_CHUNK_TOKENS = 4096


def sketch_torch(
    x: torch.Tensor,
    dy: torch.Tensor,
    p_in: torch.Tensor,
    p_out: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool = True,
) -> torch.Tensor:
    """out (+)= (dy @ p_out)^T (x @ p_in), accumulated in float32.

    Args:
        x: [N, d_in] any float dtype, any strides.
        dy: [N, d_out].
        p_in: [d_in, k_in] float32 on x's device.
        p_out: [d_out, k_out] float32.
        out: [k_out, k_in] float32, updated in place.
        accumulate: add into out (True) or overwrite it (False; NaN in out is ignored).
    """
    n = x.shape[0]
    for start in range(0, n, _CHUNK_TOKENS):
        xs = x[start : start + _CHUNK_TOKENS].to(torch.float32)
        dys = dy[start : start + _CHUNK_TOKENS].to(torch.float32)
        # beta=0 ignores what out held (even NaN) on the first chunk when overwriting.
        out.addmm_((dys @ p_out).T, xs @ p_in, beta=1.0 if (accumulate or start > 0) else 0.0)
    return out
