"""Budgeted integer rank allocation (paper §3.3) and the Δmax limit on rank changes (§3.4).

Costs are the parameters one unit of rank costs in a layer, d_in + d_out, so the adapter size is
P(r) = Σ r_l · cost_l and every function here keeps P(r) <= budget. All arithmetic on ranks and
costs is in Python ints, so the budget check is exact.
"""
from __future__ import annotations

import heapq
import math
import numbers
from typing import Sequence

import numpy as np


def parameter_count(ranks: Sequence[int], costs: Sequence[int]) -> int:
    """P(r) = Σ r_l · cost_l, the number of LoRA parameters of a rank vector.

    Args:
        ranks: [L] ints.
        costs: [L] ints, d_in + d_out per layer.
    """
    return sum(int(r) * int(c) for r, c in zip(ranks, costs, strict=True))


def allocate_ranks(
    scores: Sequence[float],
    costs: Sequence[int],
    budget: float,
    r_min: int | Sequence[int] = 0,
    r_max: int | Sequence[int] = 8,
    caps: Sequence[int] | None = None,
) -> list[int]:
    """Integer ranks proportional to scores with P(r) <= budget, maximal under the budget.

    First the paper's map r_l = clip(round(r_min_l + c · s_l), r_min_l, hi_l), with hi_l =
    min(r_max_l, caps_l) and c the largest value that fits (bisection; P is monotone in c).
    Then a greedy top-up raises ranks one at a time, always the layer whose next unit the map
    would grant first as c grows (then higher score, fewer extra units, lower index), skipping
    layers whose unit no longer fits, until no layer below hi_l fits one more unit. Hence:
    P(r) <= budget; r_min_l <= r_l <= hi_l; no layer below hi_l can take +1 within the budget;
    of two layers with equal cost and bounds, the higher-scored one never has the lower rank.
    Scores need not sum to 1; all-zero scores are treated as uniform.

    Args:
        scores: [L] finite, >= 0, e.g. spectral_scores.
        costs: [L] positive ints, d_in + d_out per layer.
        budget: parameter budget B >= Σ r_min_l · cost_l.
        r_min: lower rank bound, scalar or [L]; default 0.
        r_max: upper rank bound, scalar or [L]; default 8.
        caps: optional [L] hard upper bounds, e.g. min(d_in, d_out); default None (no caps).
    Returns:
        [L] Python ints.
    """
    n = _check_length(scores, "scores")
    s = [_as_float(v, "scores") for v in scores]
    if any(v < 0 for v in s):
        raise ValueError("scores must be >= 0; pass spectral scores or effective ranks, not log-values")
    cost = _costs(costs, n)
    cap = _budget(budget)
    lo = _per_layer(r_min, n, "r_min")
    hi = _per_layer(r_max, n, "r_max")
    for l in range(n):
        if hi[l] < lo[l]:
            raise ValueError(f"r_max ({hi[l]}) < r_min ({lo[l]}) for layer {l}; raise r_max or lower r_min")
    if caps is not None:
        caps_l = _per_layer(caps, n, "caps")
        for l in range(n):
            if caps_l[l] < lo[l]:
                raise ValueError(f"cap ({caps_l[l]}) < r_min ({lo[l]}) for layer {l}; lower r_min for that layer")
        hi = [min(h, c) for h, c in zip(hi, caps_l)]
    floor_spend = parameter_count(lo, cost)
    if floor_spend > cap:
        raise ValueError(
            f"budget {budget} is below the minimum Σ r_min·cost = {floor_spend}; raise the budget or lower r_min"
        )

    raw = s
    if max(raw) == 0.0:
        s = [1.0] * n
    else:
        # Rescale to max 1 so the search interval for c stays finite for any score scale.
        s = [v / max(raw) for v in raw]

    ranks = _proportional(s, cost, cap, lo, hi)
    spent = parameter_count(ranks, cost)

    def priority(l: int) -> tuple[float, float, int, int]:
        # c at which the map would grant layer l its next unit; the unscaled score breaks float
        # ties (rescaling may merge close scores) so a higher-scored layer is never passed over
        # by an equal-cost lower-scored one.
        nxt = (ranks[l] + 0.5 - lo[l]) / s[l] if s[l] > 0 else math.inf
        return (nxt, -raw[l], ranks[l] - lo[l], l)

    heap = [priority(l) for l in range(n) if ranks[l] < hi[l]]
    heapq.heapify(heap)
    while heap:
        l = heapq.heappop(heap)[-1]
        # spent only grows, so a unit that does not fit now never will: drop the layer.
        if spent + cost[l] > cap:
            continue
        ranks[l] += 1
        spent += cost[l]
        if ranks[l] < hi[l]:
            heapq.heappush(heap, priority(l))
    return ranks


def _proportional(s: list[float], cost: list[int], cap: int, lo: list[int], hi: list[int]) -> list[int]:
    """The paper's clip(round(lo + c·s)) with the largest c whose spend fits `cap`.

    The map only changes where some layer's lo_l + c·s_l crosses a half-integer, so the search
    bisects over those breakpoints (sorted) instead of over c: exact, and ~log2(Σ span) steps.
    """
    s_a = np.asarray(s, dtype=np.float64)
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    cost_a = np.asarray(cost, dtype=np.int64)

    def ranks_at(c: float) -> np.ndarray:
        # Round half up; np.round's half-to-even would round 2.5 and 3.5 in different directions.
        return np.clip(np.floor(lo_a + c * s_a + 0.5), lo_a, hi_a).astype(np.int64)

    def fits(c: float) -> bool:
        return int(ranks_at(c) @ cost_a) <= cap

    positive = s_a > 0
    span = (hi_a - lo_a)[positive].astype(np.int64)  # units each positive-score layer can gain
    # Layer l reaches lo_l + j + 1 at c = (j + 0.5) / s_l, j = 0 .. span_l - 1.
    j = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
    with np.errstate(over="ignore"):
        # Capped so c·s stays finite for subnormal scores (and inf·0 never makes a NaN).
        breaks = np.unique(np.minimum((j + 0.5) / np.repeat(s_a[positive], span), 1e300))
    # fits() is monotone (non-increasing) along the sorted breakpoints: find the last True.
    low, high = -1, len(breaks)  # fits(breaks[low]) holds (c = 0 when low = -1); breaks[high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if fits(breaks[mid]):
            low = mid
        else:
            high = mid
    return ranks_at(breaks[low] if low >= 0 else 0.0).tolist()


def clip_rank_change(
    old: Sequence[int], new: Sequence[int], costs: Sequence[int], budget: float, delta_max: int
) -> list[int]:
    """Move each rank from old toward new by at most delta_max, keeping P(r) <= budget.

    Decreases are applied first (they only free budget). Increases then go in order of the
    largest wanted increase new - old (then lower index), each as many units as fit, up to
    delta_max. The result always lies between old and new per layer, so bounds that old and new
    both satisfy still hold. If old itself exceeds the budget, decreases still apply and no
    increase is made: the result then exceeds the budget only if even the clipped decreases
    cannot bring it under, and it never exceeds P(old).

    Args:
        old: [L] current ranks, ints >= 0.
        new: [L] target ranks, ints >= 0 (e.g. from allocate_ranks).
        costs: [L] positive ints, d_in + d_out per layer.
        budget: parameter budget B >= 0.
        delta_max: largest allowed |change| per layer, int >= 0.
    Returns:
        [L] Python ints.
    """
    n = _check_length(old, "old")
    if _check_length(new, "new") != n:
        raise ValueError(f"old has {n} layers but new has {len(new)}; pass one rank per layer in both")
    cost = _costs(costs, n)
    cap = _budget(budget)
    delta = _as_int(delta_max, "delta_max")
    if delta < 0:
        raise ValueError(f"delta_max must be >= 0, got {delta}")
    old_r = _per_layer(old, n, "old")
    new_r = _per_layer(new, n, "new")

    ranks = [max(o - delta, t) if t < o else o for o, t in zip(old_r, new_r)]
    spent = parameter_count(ranks, cost)
    rising = sorted((l for l in range(n) if new_r[l] > old_r[l]), key=lambda l: (old_r[l] - new_r[l], l))
    for l in rising:
        want = min(new_r[l] - old_r[l], delta)
        room = max(0, (cap - spent) // cost[l])
        step = min(want, room)
        ranks[l] += step
        spent += step * cost[l]
    return ranks


def _check_length(values: Sequence, name: str) -> int:
    try:
        n = len(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence with one entry per layer") from None
    if n == 0:
        raise ValueError(f"{name} is empty; pass one entry per adapted layer")
    return n


def _as_float(value, name: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def _per_layer(value, n: int, name: str) -> list[int]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} layers; pass a scalar or one per layer")
        out = [_as_int(v, name) for v in value]
    else:
        out = [_as_int(value, name)] * n
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be >= 0")
    return out


def _costs(costs: Sequence[int], n: int) -> list[int]:
    if _check_length(costs, "costs") != n:
        raise ValueError(f"costs has {len(costs)} entries for {n} layers; pass d_in + d_out for every layer")
    out = [_as_int(c, "costs") for c in (costs.tolist() if hasattr(costs, "tolist") else costs)]
    if any(c <= 0 for c in out):
        raise ValueError("costs must be positive (d_in + d_out per layer)")
    return out


def _budget(budget: float) -> int:
    b = _as_float(budget, "budget")
    if b < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    # Spends are ints, so P <= budget exactly when P <= floor(budget).
    return math.floor(b)
