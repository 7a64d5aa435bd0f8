"""Float64 oracles for every op in the package. Slow and obvious on purpose: tests compare each
fast path against these. Nothing here is used on a hot path."""
from __future__ import annotations

import torch


def sketch_gradient(x: torch.Tensor, dy: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """S = P_out^T G P_in with G = dY^T X materialised, all in float64.

    Args:
        x: [..., d_in] layer inputs.
        dy: [..., d_out] gradients of the layer outputs (same leading dims as x).
        p_in: [d_in, k_in] projection of the input side.
        p_out: [d_out, k_out] projection of the output side.
    Returns:
        [k_out, k_in] float64.
    """
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    dy64 = dy.reshape(-1, dy.shape[-1]).to(torch.float64)
    grad = dy64.T @ x64  # [d_out, d_in]
    return p_out.to(torch.float64).T @ grad @ p_in.to(torch.float64)
