"""The mean gradient of frozen weights over a few batches: what GoRA and LoRA-GA profile."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ...lora.base_layers import is_conv1d


def as_out_in(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as [d_out, d_in]: Linear stores it so, Conv1D transposed (also
    when square); the layout rule of lora/base_layers.py."""
    return weight.T if is_conv1d(base) else weight


def mean_weight_gradients(
    model: nn.Module,
    bases: Sequence[nn.Module],
    batches: Sequence[torch.Tensor],
    loss_fn: Callable,
    progress: bool = False,
    desc: str = "profiling",
) -> list[torch.Tensor]:
    """Ḡ = mean over `batches` of d loss / d W of each base layer's weight, [d_out, d_in] float64.

    The weights are frozen before and after (requires_grad is switched on for the profile only);
    no optimizer step is taken and no other parameter gets a gradient.

    Args:
        model: called as loss_fn(model, batch).
        bases: the Linear / Conv1D layers whose weights are profiled.
        batches: at least one [B, T] batch of token ids.
    """
    from tqdm.auto import tqdm

    if len(batches) < 1:
        raise ValueError("a gradient profile needs at least one batch")
    weights = [base.weight for base in bases]
    sums = [torch.zeros(as_out_in(base, w).shape, dtype=torch.float64, device=w.device) for base, w in zip(bases, weights)]
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            grads = torch.autograd.grad(loss_fn(model, batch), weights)
            for total, grad, base in zip(sums, grads, bases):
                total += as_out_in(base, grad).double()
    finally:
        for w in weights:
            w.requires_grad_(False)
    return [total / len(batches) for total in sums]
