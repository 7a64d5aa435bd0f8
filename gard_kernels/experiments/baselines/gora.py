"""GoRA (He et al., NeurIPS 2025, arXiv:2502.12171): gradient-driven ranks and initialisation."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ...lora.base_layers import dequantized_bases
from ...lora.scaling import RankScaling
from ..method import MethodRun
from .fixed_rank import FixedRankMethod, trim_to_budget
from .gradient_profile import as_out_in, mean_weight_gradients


class GoraMethod(FixedRankMethod):
    """GoRA: ranks and B from the mean gradient of each adapted weight.

    Profiling (forward / backward, no optimizer step) on the run's first `window` batches (the
    same batches and count static GARD profiles): Ḡ_l = mean gradient of each adapted weight.
    Importance I_l = mean |W_l ⊙ Ḡ_l|, s_l = I_l / Σ I; ranks by `gora_ranks` under the same
    Σ r (d_in + d_out) <= B budget and [r_min, r_max] bounds as every method. Initialisation: A
    random (PEFT's init), B from Ḡ through the pseudo-inverse of A, so that
        scale_l * B A = -η_l Ḡ P_A,
    one gradient-descent step of Ḡ projected on A's row space. GoRA's official code (since a 2025
    commit) gives B the sign of an ascent step; this keeps the paper's descent sign. Unlike LoRA,
    the adapted model differs from the base model before training, as in the paper (W is not
    modified).

    The method's options (presets.METHODS "options"; the defaults are the first study's GoRA):
        fill: False leaves what rounding the shares leaves unspent (the paper's formula); True
            tops the ranks up by largest remainder while a unit fits (`gora_fill`), as every
            other allocator spends its budget.
        xi: the step η_l. "lr": the run's learning rate scaled for what the projection loses,
            lr * sqrt(d_in / r) (the paper's learning-rate-scaled init); a number ξ: GoRA's own
            step size (`--gora-lr`), η = ξ / ŝ with ŝ = sqrt(r) under rank-stabilised scaling
            and the average rank r̄ under constant scaling (the official code's scale_rank);
            "adaptive": the official code's choice, η = λ sqrt(d_in / r) with λ the candidate
            of 1, 0.8, 0.64, ... >= 1e-5 whose loss on the first profiled batch is lowest, if it
            is below the loss with B = 0 (else B = 0).
        rank_scaling: "constant": every layer's update is scaled by the shared `scaling`;
            "rslora": scale_l = scaling * sqrt(r̄ / r_l) with r̄ = budget / Σ(d_in + d_out), the
            official scripts' rank-stabilised scaling α / sqrt(r) (equal to `scaling` at the
            average rank, so uniform LoRA at r̄ would be unchanged).
        ranks_from: None, or a glob pattern with {budget} and {seed} naming exactly one earlier
            run's metrics.json whose final ranks are used instead of GoRA's (a diagnostic: GoRA's
            initialisation on another method's rank pattern, e.g. AdaLoRA's); refused when the
            pattern costs more than the budget.
    """

    OPTIONS = {"fill": False, "xi": "lr", "rank_scaling": "constant", "ranks_from": None}

    def __init__(self, run: MethodRun):
        super().__init__(run)
        self.options = {**self.OPTIONS, **run.options}
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"{run.name}: unknown GoRA option(s) {unknown}; known: {sorted(self.OPTIONS)}")
        if self.options["rank_scaling"] not in ("constant", "rslora"):
            raise ValueError(f"{run.name}: rank_scaling must be 'constant' or 'rslora', got {self.options['rank_scaling']!r}")
        xi = self.options["xi"]
        if xi not in ("lr", "adaptive") and not (isinstance(xi, (int, float)) and not isinstance(xi, bool) and xi > 0):
            raise ValueError(f"{run.name}: xi must be 'lr', 'adaptive' or a positive number, got {xi!r}")
        self.window = run.settings.value("window", run.name)
        self.scaling = run.settings.value("scaling", run.name)
        self.lr, self.seed = run.lr, run.seed
        self.average_rank = self.budget / sum(self.manager.costs)
        self.scale = RankScaling(self.scaling, self.options["rank_scaling"], self.average_rank)
        self.details = {"profile_batches": self.window, "init_lr": run.lr, "options": dict(self.options)}

    def prepare(self, batches, loss_fn, progress=False):
        with dequantized_bases(self.manager.layers):  # quantised weights can take no gradient
            self._prepare(batches, loss_fn, progress)

    def _prepare(self, batches, loss_fn, progress=False):
        layers = self.manager.layers
        used = batches[: self.window]
        means = mean_weight_gradients(self.model, [layer.base for layer in layers], used, loss_fn, progress, "gora profiling")
        importance = []
        for layer, grad in zip(layers, means):
            importance.append(float((as_out_in(layer.base, layer.base.weight.detach().double()) * grad).abs().mean()))
        if self.options["ranks_from"]:
            plan = self._ranks_from(self.options["ranks_from"])
        else:
            allocate = gora_fill if self.options["fill"] else gora_ranks
            plan = allocate(importance, self.manager.costs, self.manager.caps, self.budget, self.r_min, self.r_max)
        # Per layer, the B of a unit step η = 1 (scale * B A = -Ḡ P_A), scaled below.
        unit_b = []
        for layer, rank, grad in zip(layers, plan, means):
            layer.resize(rank, generator=self.generator)
            layer.scaling = self.scale(rank)
            unit_b.append(unit_step_b(layer.lora_A.detach(), grad, layer.scaling) if rank else None)
        steps = self._steps(plan)
        if self.options["xi"] == "adaptive":
            factor, losses = self._adaptive_factor(unit_b, steps, used[0], loss_fn)
            steps = [factor * step for step in steps]
            self.details["adaptive_xi"] = {"lambda": factor, **losses}
        self._set_b(unit_b, steps)
        self.details.update({
            "importance": importance,
            "plan": self.plan(plan),
            "spent": sum(r * c for r, c in zip(plan, self.manager.costs)),
            "init_steps": self.plan([round(s, 8) for s in steps]),
            "scalings": self.plan([round(layer.scaling, 6) for layer in layers]),
        })

    def _ranks_from(self, pattern: str) -> list[int]:
        """The final ranks of the one run whose metrics.json matches `pattern` (see ranks_from)."""
        import glob
        import json

        path = pattern.format(budget=self.budget, seed=self.seed)
        found = sorted(glob.glob(path))
        if len(found) != 1:
            raise ValueError(f"{self.name}: ranks_from {path!r} must match exactly one metrics.json, found {found or 'none'}")
        with open(found[0], encoding="utf-8") as f:
            ranks = json.load(f)["final_ranks"]
        missing = [name for name in self.manager.names if name not in ranks]
        if missing:
            raise ValueError(f"{self.name}: {found[0]} has no rank for {missing[:3]} ({len(missing)} modules)")
        # Within the bounds every method runs under (the other run may have had wider ones).
        plan = [min(int(ranks[name]), self.r_max, cap) for name, cap in zip(self.manager.names, self.manager.caps)]
        spent = sum(r * c for r, c in zip(plan, self.manager.costs))
        if spent > self.budget:
            raise ValueError(f"{self.name}: the ranks of {found[0]} cost {spent} parameters, over the budget {self.budget}")
        self.details["ranks_from"] = found[0]
        return plan

    def _steps(self, plan: Sequence[int]) -> list[float]:
        """η_l of every layer for xi "lr" or a number; for "adaptive", the steps of λ = 1."""
        xi = self.options["xi"]
        steps = []
        for layer, rank in zip(self.manager.layers, plan):
            if not rank:
                steps.append(0.0)
            elif xi == "lr":
                steps.append(self.lr * math.sqrt(layer.d_in / rank))
            elif xi == "adaptive":
                steps.append(math.sqrt(layer.d_in / rank))
            else:
                rank_scale = math.sqrt(rank) if self.options["rank_scaling"] == "rslora" else self.average_rank
                steps.append(float(xi) / rank_scale)
        return steps

    def _set_b(self, unit_b: Sequence, steps: Sequence[float]) -> None:
        with torch.no_grad():
            for layer, b, step in zip(self.manager.layers, unit_b, steps):
                if b is not None:
                    layer.lora_B.copy_((step * b).to(layer.lora_B.dtype))

    def _adaptive_factor(self, unit_b, steps, batch, loss_fn) -> tuple[float, dict]:
        """GoRA's adaptive step: the λ of `adaptive_candidates` with the lowest loss on `batch`,
        if below the loss at B = 0; else 0."""
        def loss_at(factor: float) -> float:
            self._set_b(unit_b, [factor * s for s in steps])
            with torch.no_grad():
                return float(loss_fn(self.model, batch))

        base = loss_at(0.0)
        best, best_loss = 0.0, base
        for factor in adaptive_candidates():
            loss = loss_at(factor)
            if loss < best_loss:
                best, best_loss = factor, loss
        return best, {"loss_at_zero": base, "loss_chosen": best_loss}


def adaptive_candidates(largest: float = 1.0, ratio: float = 0.8, smallest: float = 1e-5) -> list[float]:
    """GoRA's candidates for its adaptive step: largest, largest * ratio, ... while >= smallest,
    then smallest itself."""
    candidates = []
    value = largest
    while value >= smallest:
        candidates.append(value)
        value *= ratio
    if candidates[-1] > smallest:
        candidates.append(smallest)
    return candidates


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


def unit_step_b(a: torch.Tensor, grad: torch.Tensor, scaling: float) -> torch.Tensor:
    """The B with scaling * B A = -Ḡ P_A (P_A the projection onto A's rows): -Ḡ A^T (A A^T)^-1 / scaling.

    Args:
        a: [r, d_in] the layer's A. grad: [d_out, d_in] mean gradient Ḡ.
    Returns:
        [d_out, r] float64.
    """
    a = a.double()
    # pinv, not inv: A A^T of a random A is well conditioned, but this never divides by ~0.
    return -(grad.double() @ a.T @ torch.linalg.pinv(a @ a.T)) / scaling


def gora_init_b(a: torch.Tensor, grad: torch.Tensor, lr: float, scaling: float) -> torch.Tensor:
    """GoRA's B for xi "lr": the unit step times η = lr * sqrt(d_in / r) (see GoraMethod).

    Args:
        a: [r, d_in] the layer's A. grad: [d_out, d_in] mean gradient Ḡ.
    Returns:
        [d_out, r] float64.
    """
    r, d_in = a.shape
    return lr * math.sqrt(d_in / r) * unit_step_b(a, grad, scaling)


def gora_fill(importance: Sequence[float], costs: Sequence[int], caps: Sequence[int], budget: int, r_min: int, r_max: int) -> list[int]:
    """`gora_ranks`, then what its rounding left unspent: one unit at a time to the layer with
    the largest remainder (its exact share B s_l / c_l minus its rank) among those whose next
    unit still fits under the budget and min(r_max, cap); ties to the cheaper, then earlier
    layer. Never exceeds the budget; stops when no unit fits.

    Args: as `gora_ranks`.
    """
    ranks = gora_ranks(importance, costs, caps, budget, r_min, r_max)
    total = float(sum(importance))
    shares = [v / total if total > 0 else 1.0 / len(costs) for v in importance]
    exact = [budget * s / c for s, c in zip(shares, costs)]
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    while True:
        fits = [i for i in range(len(costs)) if costs[i] <= left and ranks[i] < min(r_max, caps[i])]
        if not fits:
            return ranks
        i = max(fits, key=lambda j: (exact[j] - ranks[j], -costs[j], -j))
        ranks[i] += 1
        left -= costs[i]
