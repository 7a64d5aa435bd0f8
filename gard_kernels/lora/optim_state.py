"""Optimizer state that follows a LoRA factor through a rank change.

A rank change slices a factor along its rank dimension (shrink by norm), pads it (grow), or
replaces it by a rotated factor (shrink by SVD). Elementwise optimizers (SGD, Adam, AdamW,
RMSprop, Adagrad, ...) keep per-parameter state that is either shaped like the parameter
(moments, momentum buffers) or scalar (step counters), and both have an obvious image under a
slice or pad: tensors are sliced along the rank dimension and zero-padded for new directions,
scalars are kept. Any other state (Adafactor-style row/column factors, L-BFGS histories) has no
such image, so it is refused with an error before anything is changed.
"""
from __future__ import annotations

import numbers
from typing import Iterable

import torch

__all__ = ["check_remappable", "remap_along", "remap_optimizer_state", "reset_optimizer_state"]


def _is_scalar(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return value is None or isinstance(value, (numbers.Number, bool))


def check_remappable(optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """Raise if some state of `optimizer` for `params` cannot follow a slice / pad.

    Call it before changing anything, so a refused rank change leaves the model untouched.

    Raises:
        TypeError: naming the optimizer class, the state key and shape, and what to do instead.
    """
    if optimizer is None:
        return
    for param in params:
        for key, value in optimizer.state.get(param, {}).items():
            if _is_scalar(value):
                continue
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                continue
            what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(
                f"{type(optimizer).__name__} keeps state[{key!r}] ({what}) for a LoRA factor of shape "
                f"{tuple(param.shape)}: it is neither shaped like the parameter nor a scalar (e.g. "
                "factored second moments), so it cannot follow a rank change. Use an optimizer with "
                "elementwise state (torch.optim.AdamW, Adam, SGD, ...), or resize with optimizer=None "
                "and build a new optimizer after the rank change."
            )


def remap_along(t: torch.Tensor, index: torch.Tensor, new_size: int, dim: int) -> torch.Tensor:
    """New tensor whose slots [0, len(index)) along `dim` are t's slots `index`, zeros after.

    Args:
        t: tensor of any shape.
        index: [k] int64 positions along `dim` of t, k <= new_size.
        new_size: size of the result along `dim`.
        dim: the rank dimension (0 for lora_A [r, d_in], 1 for lora_B [d_out, r]).
    """
    shape = list(t.shape)
    shape[dim] = new_size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, index.numel()).copy_(t.index_select(dim, index.to(t.device)))
    return out


def remap_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: torch.Tensor, new_size: int, dim: int
) -> None:
    """Make `optimizer`'s state for `param` follow a slice / pad along the rank dimension.

    Every state tensor shaped like `param` (exp_avg, exp_avg_sq, max_exp_avg_sq,
    momentum_buffer, ...) becomes remap_along(state, index, new_size, dim): kept directions keep
    their state exactly, new ones start from zero. Scalar state (step counters) is kept. Call it
    BEFORE `param.data` takes its new shape (state is matched against the current shape).

    Args:
        optimizer: the optimizer holding `param`, or None (nothing to do).
        param: the LoRA factor.
        index: [k] int64 old positions kept, in their new order.
        new_size: new size of the rank dimension (>= k; slots k.. are new directions).
        dim: the rank dimension of `param`.
    Raises:
        TypeError: state that is neither parameter-shaped nor scalar (see check_remappable).
    """
    if optimizer is None or param not in optimizer.state:
        return
    check_remappable(optimizer, [param])
    state = optimizer.state[param]
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            state[key] = remap_along(value, index, new_size, dim)


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> None:
    """Forget `optimizer`'s state for `param`, so the next step treats it as a new parameter.

    Used after an SVD re-factorisation: the factors are rotated, so elementwise moments of the
    old coordinates describe nothing in the new ones. Dropping the state, counters included,
    restarts Adam's bias correction with the moments; zeroing the moments but keeping a large
    step count would make the first update about (1 - beta1) / sqrt(1 - beta2) ~ 3 times lr
    per element.
    """
    if optimizer is not None:
        optimizer.state.pop(param, None)
