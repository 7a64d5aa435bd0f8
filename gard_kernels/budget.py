"""Budgets in the units users think in: the parameters of uniform LoRA at a rank.

GARD's budget B counts parameters, Σ r_l (d_in + d_out); LoRA users set a rank ("r=8 on
all-linear"). `lora_budget` converts: the budget uniform LoRA at that rank spends on the same
target modules, which GARD then redistributes.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from .lora.base_layers import adapter_shape
from .lora.manager import find_targets

__all__ = ["adapter_costs", "lora_budget"]


def adapter_costs(model: nn.Module, target_modules: Union[Sequence[str], str]) -> list[int]:
    """d_in + d_out of every target module of an unwrapped model, in model order (one rank unit of
    each costs that many parameters)."""
    return [sum(adapter_shape(target.module)) for target in find_targets(model, target_modules)]


def lora_budget(model: nn.Module, target_modules: Union[Sequence[str], str], rank: int) -> int:
    """The parameters of uniform LoRA at `rank` on `target_modules`: rank x Σ(d_in + d_out).

    `lora_budget(model, "all-linear", 8)` is the budget of PEFT's LoraConfig(r=8,
    target_modules="all-linear") on the same model (2,442,240 on SmolLM2-135M).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (the uniform LoRA rank to match), got {rank!r}")
    return rank * sum(adapter_costs(model, target_modules))
