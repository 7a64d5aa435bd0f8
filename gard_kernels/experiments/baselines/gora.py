"""GoRA (He et al., NeurIPS 2025, arXiv:2502.12171): gradient-driven ranks and initialisation."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..method import MethodRun
from .fixed_rank import FixedRankMethod, trim_to_budget


class GoraMethod(FixedRankMethod):
    """GoRA: ranks and B from the mean gradient of each adapted weight.

    Profiling (forward / backward, no optimizer step) on the run's first `window` batches (the
    same batches and count static GARD profiles): Ḡ_l = mean gradient of each adapted weight.
    Importance I_l = mean |W_l ⊙ Ḡ_l|, s_l = I_l / Σ I; ranks by `gora_ranks` under the same
    Σ r (d_in + d_out) <= B budget and [r_min, r_max] bounds as every method. Initialisation: A
    random (PEFT's init), B from Ḡ through the pseudo-inverse of A,
        B = -(lr / sqrt(r / d_in)) / scaling * Ḡ A^T (A A^T)^-1,
    so scaling * B A = -lr / sqrt(r / d_in) * Ḡ P_A: one gradient-descent step of Ḡ projected on
    A's row space, scaled up by sqrt(d_in / r) for what the projection loses (the paper's
    learning-rate-scaled initialisation). Unlike LoRA, the adapted model differs from the base
    model before training, as in the paper (W is not modified).
    """

    def __init__(self, run: MethodRun):
        super().__init__(run)
        self.window = run.settings.value("window", run.name)
        self.lr = run.lr
        self.details = {"profile_batches": self.window, "init_lr": run.lr}

    def prepare(self, batches, loss_fn, progress=False):
        if len(batches) < 1:
            raise ValueError("gora needs at least one batch to profile gradients")
        layers = self.manager.layers
        means = self._mean_gradients(batches[: self.window], loss_fn, progress)
        importance = []
        for layer, grad in zip(layers, means):
            importance.append(float((_as_out_in(layer.base, layer.base.weight.detach().double()) * grad).abs().mean()))
        plan = gora_ranks(importance, self.manager.costs, self.manager.caps, self.budget, self.r_min, self.r_max)
        for layer, rank, grad in zip(layers, plan, means):
            layer.resize(rank, generator=self.generator)
            if rank:
                with torch.no_grad():
                    layer.lora_B.copy_(gora_init_b(layer.lora_A.detach(), grad, self.lr, layer.scaling).to(layer.lora_B.dtype))
        self.details.update({"importance": importance, "plan": self.plan(plan)})

    def _mean_gradients(self, used: Sequence[torch.Tensor], loss_fn, progress: bool) -> list[torch.Tensor]:
        """Ḡ_l, [d_out, d_in] float64, of every adapted weight over the batches `used`."""
        from tqdm.auto import tqdm

        layers = self.manager.layers
        weights = [layer.base.weight for layer in layers]
        sums = [torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64, device=w.device) for layer, w in zip(layers, weights)]
        for w in weights:
            w.requires_grad_(True)
        try:
            for batch in tqdm(used, desc="gora profiling", unit="batch", disable=not progress, leave=False):
                grads = torch.autograd.grad(loss_fn(self.model, batch), weights)
                for total, grad, layer in zip(sums, grads, layers):
                    total += _as_out_in(layer.base, grad).double()
        finally:
            for w in weights:
                w.requires_grad_(False)
        return [total / len(used) for total in sums]


def _as_out_in(base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as [d_out, d_in]: Linear stores it so, Conv1D transposed (also
    when square)."""
    return weight if isinstance(base, nn.Linear) else weight.T


def gora_ranks(importance: Sequence[float], costs: Sequence[int], caps: Sequence[int], budget: int, r_min: int, r_max: int) -> list[int]:
    """GoRA's allocation: r_l = round(B s_l / (d_in + d_out)), s = importance / Σ importance,
    clamped to [r_min, min(r_max, cap)], then lowered where rounding overshot until Σ r c <= B.

    Under a budget so tight that every share rounds to 0 (2,570 parameters over 60 SmolLM2
    modules: every B s_l / c_l < 0.5), the formula adapts nothing and GoRA could not train at
    all. Our extension for that case only: rank 1 goes to the most important layers, in order,
    while it fits (ties to the cheaper, then earlier layer). Otherwise the formula stands, and
    the budget it leaves unspent stays unspent, as in the paper.

    Args:
        importance: [L] non-negative layer importances (GoRA: mean |W ⊙ Ḡ|).
        costs: [L] d_in + d_out; caps: [L] min(d_in, d_out).
    """
    total = float(sum(importance))
    shares = [v / total if total > 0 else 1.0 / len(costs) for v in importance]
    exact = [budget * s / c for s, c in zip(shares, costs)]
    ranks = [max(r_min, min(r_max, cap, round(x))) for x, cap in zip(exact, caps)]
    ranks = trim_to_budget(ranks, costs, budget, [r - x for r, x in zip(ranks, exact)], r_min)
    if not any(ranks):
        spent = 0
        for i in sorted(range(len(costs)), key=lambda j: (-importance[j], costs[j], j)):
            if min(r_max, caps[i]) >= 1 and spent + costs[i] <= budget:
                ranks[i], spent = 1, spent + costs[i]
    return ranks


def gora_init_b(a: torch.Tensor, grad: torch.Tensor, lr: float, scaling: float) -> torch.Tensor:
    """GoRA's B: -(lr / sqrt(r / d_in)) / scaling * Ḡ A^T (A A^T)^-1 (see GoraMethod).

    Args:
        a: [r, d_in] the layer's A. grad: [d_out, d_in] mean gradient Ḡ.
    Returns:
        [d_out, r] float64.
    """
    r, d_in = a.shape
    a = a.double()
    # pinv, not inv: A A^T of a random A is well conditioned, but this never divides by ~0.
    b = grad.double() @ a.T @ torch.linalg.pinv(a @ a.T)
    return -(lr / math.sqrt(r / d_in)) / scaling * b
