"""RankScaling: the LoRA branch's scale as a function of the layer's rank.

y = W x + scale(r) · B A x with scale(r) = scaling · (r_ref / r)^p: p = 0 ("constant", one scale
for every rank), p = 1/2 ("rslora": rank-stabilised LoRA, Kalajdzievski 2023, α/√r) or p = 1
("linear": PEFT's α/r with α fixed). r_ref is the rank at which every rule gives `scaling`, GARD
takes the average rank the budget allows, so that uniform LoRA at that rank is the same under
every rule and only layers above or below the average see a different scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCALING_RULES", "RankScaling"]

# rule -> p in scale(r) = scaling * (r_ref / r)^p.
SCALING_RULES = {"constant": 0.0, "rslora": 0.5, "linear": 1.0}


@dataclass(frozen=True)
class RankScaling:
    """scale(r) = scaling · (r_ref / r)^p, p from SCALING_RULES[rule].

    Args:
        scaling: the scale at rank r_ref (> 0).
        rule: a key of SCALING_RULES.
        r_ref: the reference rank (> 0; need not be an integer).
    """

    scaling: float
    rule: str = "constant"
    r_ref: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in SCALING_RULES:
            raise ValueError(f"scaling rule must be one of {tuple(SCALING_RULES)}, got {self.rule!r}")
        if not (self.scaling > 0 and math.isfinite(self.scaling)):
            raise ValueError(f"scaling must be a positive finite number, got {self.scaling!r}")
        if not (self.r_ref > 0 and math.isfinite(self.r_ref)):
            raise ValueError(f"r_ref must be a positive finite number, got {self.r_ref!r}")

    def __call__(self, rank: int) -> float:
        """The scale of a rank-`rank` layer; rank 0 (no branch) gets `scaling`."""
        power = SCALING_RULES[self.rule]
        if rank == 0 or power == 0.0:
            return float(self.scaling)
        return float(self.scaling * (self.r_ref / rank) ** power)
