"""Standard LoRA: one rank everywhere, under the same parameter budget as every method."""
from __future__ import annotations

from typing import Optional, Sequence

from ..method import MethodRun
from .fixed_rank import FixedRankMethod


class UniformMethod(FixedRankMethod):
    """Standard LoRA: one rank everywhere, through GARD's LoRA layers with capture off.

    The rank is the largest r <= r_max with r * Σ(d_in + d_out) <= budget (capped per layer at
    min(d_in, d_out)). When even rank 1 everywhere exceeds the budget, rank 1 goes to as many
    modules as fit, walking from the last module (deepest layer) towards the first and skipping
    a module whose unit no longer fits; the rest get rank 0.
    """

    def __init__(self, run: MethodRun):
        super().__init__(run)
        plan, fallback = uniform_ranks(self.manager.costs, self.manager.caps, self.budget, self.r_max)
        for layer, rank in zip(self.manager.layers, plan):
            layer.resize(rank, generator=self.generator)
        self.details = {"uniform_rank": max(plan), "last_layers_fallback": fallback, "plan": self.plan(plan)}


def uniform_ranks(costs: Sequence[int], caps: Sequence[int], budget: int, r_max: Optional[int] = None) -> tuple[list[int], bool]:
    """Uniform LoRA's ranks under a parameter budget and the rank bound r_max (see UniformMethod).

    Args:
        costs: [L] d_in + d_out; caps: [L] min(d_in, d_out).
    Returns:
        (ranks, fallback): fallback is True when rank 1 everywhere did not fit.
    """
    rank = budget // sum(costs)
    if r_max is not None:
        rank = min(rank, r_max)
    if rank >= 1:
        return [min(rank, cap) for cap in caps], False
    ranks = [0] * len(costs)
    left = budget
    for i in reversed(range(len(costs))):
        if costs[i] <= left and caps[i] >= 1:
            ranks[i] = 1
            left -= costs[i]
    return ranks, True
