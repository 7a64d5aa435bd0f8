"""Marginal-gain rank allocation: grant the rank units worth most per parameter until the budget is spent.

Unit j of layer l (its (j+1)-th direction) is worth g_{l,j} / cost_l, cost_l = d_in + d_out, with
g_{l,j} an estimate of the j-th singular value of the layer's mean gradient (lora/gain_probe.py):
the loss decrease a rank-r update can buy in a layer grows with the sum of its top r singular
values. A layer's gains fall with j, so granting units in decreasing order of worth always
extends each layer's prefix, and the greedy solves the fractional problem exactly; only the
last, integer step can leave value behind, which the top-up (keep granting the best units that
still fit) recovers in part. The result is within one unit's gain of the best integer choice.
"""
from __future__ import annotations

import math
from typing import Sequence

from .allocate import _budget, _costs, _per_layer, parameter_count

__all__ = ["GAIN_SCORES", "allocate_marginal"]

# GARDConfig.score values allocated by this rule -> the power of the singular value a unit is
# worth: "marginal_gain" sigma_j, "marginal_gain_sq" sigma_j^2 (the ablation: the squared
# singular value is the loss decrease of a gradient step along the direction, to first order).
GAIN_SCORES = {"marginal_gain": 1, "marginal_gain_sq": 2}


def allocate_marginal(
    gains: Sequence[Sequence[float]],
    costs: Sequence[int],
    budget: float,
    r_min: int | Sequence[int] = 0,
    r_max: int | Sequence[int] = 8,
    caps: Sequence[int] | None = None,
) -> list[int]:
    """Integer ranks that maximise Σ_l Σ_{j < r_l} gains[l][j] under P(r) <= budget (greedy).

    Every layer first gets r_min_l units. Then units j >= r_min_l with a positive gain are taken
    in decreasing order of gains[l][j] / costs[l] (ties: lower layer index first), each one granted
    when it fits the budget and skipped (with the rest of its layer) when it does not: the greedy's
    integer top-up. Units with gain 0 are never granted, so budget can stay unspent when fewer
    positive-gain units exist than it affords.

    Guarantees: P(r) <= budget; r_min_l <= r_l <= min(r_max_l, caps_l); no unit with a positive
    gain that fits is left out; Σ gains of the result >= OPT - (gain of the first unit that did
    not fit), OPT the best integer allocation; with equal costs the result is OPT.

    Args:
        gains: [L] sequences of finite gains >= 0, non-increasing in j (a layer's best directions
            first); a sequence shorter than the layer's upper bound means the units after it are
            worth 0.
        costs: [L] positive ints, d_in + d_out per layer.
        budget: parameter budget B >= Σ r_min_l · cost_l.
        r_min: lower rank bound, scalar or [L]; default 0.
        r_max: upper rank bound, scalar or [L]; default 8.
        caps: optional [L] hard upper bounds, e.g. min(d_in, d_out); default None.
    Returns:
        [L] Python ints.
    """
    n = len(gains)
    if n == 0:
        raise ValueError("gains is empty; pass one sequence of gains per adapted layer")
    cost = _costs(costs, n)
    cap = _budget(budget)
    lo = _per_layer(r_min, n, "r_min")
    hi = _per_layer(r_max, n, "r_max")
    if caps is not None:
        hi = [min(h, c) for h, c in zip(hi, _per_layer(caps, n, "caps"))]
    for l in range(n):
        if hi[l] < lo[l]:
            raise ValueError(f"upper bound min(r_max, cap) = {hi[l]} < r_min = {lo[l]} for layer {l}; lower r_min")
    values = [_check_gains(g, l) for l, g in enumerate(gains)]
    floor_spend = parameter_count(lo, cost)
    if floor_spend > cap:
        raise ValueError(
            f"budget {budget} is below the minimum Σ r_min·cost = {floor_spend}; raise the budget or lower r_min"
        )
    ranks = list(lo)
    spent = floor_spend
    # Within a layer the order is j ascending (gains fall with j), so each grant extends a prefix.
    units = sorted(
        ((values[l][j] / cost[l], l, j) for l in range(n) for j in range(lo[l], min(hi[l], len(values[l])))
         if values[l][j] > 0),
        key=lambda unit: (-unit[0], unit[1], unit[2]),
    )
    closed = [False] * n
    for _, l, j in units:
        if closed[l] or j != ranks[l]:
            continue
        # spent only grows: a unit that does not fit now never will, nor will the layer's next.
        if spent + cost[l] > cap:
            closed[l] = True
            continue
        ranks[l] += 1
        spent += cost[l]
    return ranks


def _check_gains(gains: Sequence[float], layer: int) -> list[float]:
    values = [float(g) for g in (gains.tolist() if hasattr(gains, "tolist") else gains)]
    if any(not math.isfinite(g) or g < 0 for g in values):
        raise ValueError(f"gains of layer {layer} must be finite and >= 0, got {values}")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"gains of layer {layer} must be non-increasing (its best directions first), got {values}; sort them"
        )
    return values
