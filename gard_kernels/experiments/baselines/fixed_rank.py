"""The base of baselines whose ranks are chosen before training, and the trim they share."""
from __future__ import annotations

from typing import Sequence

import torch

from ...allocate import parameter_count
from ...config import default_r_max
from ...lora.manager import LoRAManager
from ..method import Method, MethodRun


class FixedRankMethod(Method):
    """GARD's LoRA layers at ranks chosen before training, capture off (no sketching, no
    overhead). Subclasses resize `self.manager.layers` in __init__ or prepare()."""

    def __init__(self, run: MethodRun):
        self.name, self.model, self.budget = run.name, run.model, run.budget
        self.generator = torch.Generator().manual_seed(run.seed)
        settings = run.settings
        self.manager = LoRAManager(run.model, settings.value("target_modules", run.name), 0, settings.value("scaling", run.name))
        self.r_min = settings.value("r_min", run.name)
        self.r_max = method_r_max(run, self.manager.costs)

    def parameters(self):
        return self.manager.parameters()

    def num_params(self):
        return self.manager.num_params()

    def ranks(self):
        return dict(zip(self.manager.names, self.manager.ranks))

    def plan(self, ranks: Sequence[int]) -> dict[str, int]:
        """Module name -> rank, for metrics.json."""
        return dict(zip(self.manager.names, ranks))


def method_r_max(run: MethodRun, costs: Sequence[int]) -> int:
    """The rank bound method run.name runs under: its preset's (the baselines pin the earlier 8),
    else the comparison's, else GARDConfig's r_max=None scaled with the budget over `costs`."""
    return run.settings.value("r_max", run.name) or default_r_max(run.budget, costs)


def trim_to_budget(ranks: list[int], costs: Sequence[int], budget: int, excess: Sequence[float], r_min: int = 0) -> list[int]:
    """Lower ranks one unit at a time until Σ r c <= budget, always where `excess` (how far a
    layer's rank is above what it deserves) is largest; ties go to the costlier layer.

    Args:
        ranks: [L] ranks (a new list is returned).
        costs: [L] d_in + d_out.
        excess: [L] per-layer excess of its rank over its share (recomputed as ranks fall).
        r_min: no rank goes below it.
    """
    ranks = list(ranks)
    excess = list(excess)
    while parameter_count(ranks, costs) > budget:
        candidates = [i for i, r in enumerate(ranks) if r > r_min]
        if not candidates:
            raise ValueError(f"budget {budget} is below r_min={r_min} on every layer")
        i = max(candidates, key=lambda j: (excess[j], costs[j], -j))
        ranks[i] -= 1
        excess[i] -= 1.0
    return ranks
