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
    current: Sequence[int] | None = None,
    dead_band: float = 0.0,
) -> list[int]:
    """Integer ranks proportional to scores with P(r) <= budget, maximal under the budget.

    Unit j (0-based above r_min_l) of layer l is granted once the scale c of the paper's map
    r_l = clip(round(r_min_l + c · s_l), r_min_l, hi_l) reaches (j + 0.5) / s_l, hi_l =
    min(r_max_l, caps_l). First every unit up to the largest c that fits is granted (bisection;
    the spend is monotone in c), then a greedy top-up grants the remaining units in order of that
    c (then units the layer holds now, higher score, fewer extra units, lower index), skipping
    units that no longer fit.

    Hysteresis (dynamic re-allocation): units a layer holds now (j < current_l - r_min_l) count
    as if its score were s_l · (1 + dead_band). A unit therefore leaves a layer for another one
    only when the receiver's score per unit exceeds the holder's by more than that factor, and
    exact ties go to the holder. Stable: with the same scores and dead_band, passing as `current`
    a call's result, or any ranks between that call's `current` and its result (a move that
    clip_rank_change cut short), returns that result again.

    Layers with score 0 stay at r_min_l when any score is positive (their gradient carries
    nothing to adapt); the budget they leave may stay unspent. All-zero scores are uniform.
    Hence: P(r) <= budget; r_min_l <= r_l <= hi_l; no layer with a positive score (or any layer
    when all are 0) below hi_l can take +1 within the budget; without `current`, of two layers
    with equal cost and bounds the higher-scored one never has the lower rank.

    Args:
        scores: [L] finite, >= 0, e.g. spectral_scores.
        costs: [L] positive ints, d_in + d_out per layer.
        budget: parameter budget B >= Σ r_min_l · cost_l.
        r_min: lower rank bound, scalar or [L]; default 0.
        r_max: upper rank bound, scalar or [L]; default 8.
        caps: optional [L] hard upper bounds, e.g. min(d_in, d_out); default None (no caps).
        current: optional [L] ranks held now (ints >= 0, any values; only units inside the
            bounds count as held); default None (no hysteresis).
        dead_band: relative score advantage, >= 0, a layer needs to take a unit from a holder;
            default 0.0 (ties only). Ignored without `current`.
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
    band = _as_float(dead_band, "dead_band")
    if band < 0:
        raise ValueError(f"dead_band must be >= 0, got {dead_band!r}")
    held = [0] * n  # units above r_min that each layer holds now
    if current is not None:
        now = _per_layer(current, n, "current")
        held = [min(max(now[l], lo[l]), hi[l]) - lo[l] for l in range(n)]
    boost = 1.0 + band

    raw = s
    if max(raw) == 0.0:
        s = [1.0] * n
    else:
        # Rescale to max 1 so the search interval for c stays finite for any score scale. Score-0
        # layers keep s = 0: their units are never granted (break at c = inf), so they stay at r_min.
        s = [v / max(raw) for v in raw]

    ranks = _proportional(s, cost, cap, lo, hi, held, boost)
    spent = parameter_count(ranks, cost)

    def priority(l: int) -> tuple[float, bool, float, int, int]:
        # c at which the map would grant layer l its next unit; a held unit wins exact ties, and
        # the unscaled score breaks float ties (rescaling may merge close scores) so a
        # higher-scored layer is never passed over by an equal-cost lower-scored one.
        j = ranks[l] - lo[l]
        nxt = _unit_break(j, s[l], held[l], boost)
        return (nxt, j >= held[l], -raw[l], j, l)

    # Score-0 layers (s = 0 after rescaling) never enter the queue.
    heap = [priority(l) for l in range(n) if ranks[l] < hi[l] and s[l] > 0]
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


def _unit_break(j: int, s: float, held: int, boost: float) -> float:
    """c at which the map grants unit j (0-based above r_min) of a layer with rescaled score s."""
    if s <= 0:
        return math.inf
    return min((j + 0.5) / (s * boost if j < held else s), 1e300)


def _proportional(
    s: list[float], cost: list[int], cap: int, lo: list[int], hi: list[int], held: list[int], boost: float
) -> list[int]:
    """Every unit whose break (see _unit_break) is <= the largest c whose spend fits `cap`.

    A layer's breaks increase with j (held units come first and are only made earlier by the
    boost), so its rank at c is r_min plus the number of its breaks <= c. The spend only changes
    at breakpoints, so the search bisects over them (sorted) instead of over c: exact, and
    ~log2(Σ span) steps.
    """
    s_a = np.asarray(s, dtype=np.float64)
    lo_a = np.asarray(lo, dtype=np.int64)
    cost_a = np.asarray(cost, dtype=np.int64)
    n = len(s)

    positive = s_a > 0
    span = np.where(positive, np.asarray(hi, dtype=np.int64) - lo_a, 0)  # units each layer can gain
    layer = np.repeat(np.arange(n), span)
    # j = 0 .. span_l - 1 within each layer.
    j = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
    mult = np.where(j < np.asarray(held, dtype=np.int64)[layer], boost, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        # Capped so c·s stays finite for subnormal scores.
        unit_breaks = np.minimum((j + 0.5) / (s_a[layer] * mult), 1e300)

    def ranks_at(c: float) -> np.ndarray:
        return lo_a + np.bincount(layer[unit_breaks <= c], minlength=n)

    def fits(c: float) -> bool:
        return int(ranks_at(c) @ cost_a) <= cap

    breaks = np.unique(unit_breaks)
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
