import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gard_kernels import reference
from gard_kernels.allocate import allocate_ranks, clip_rank_change, parameter_count

# Per-rank costs (d_in + d_out) of SmolLM2's q, k, v, o and an MLP projection.
SMOLLM2_COSTS = [1152, 640, 640, 1152, 2112]


@st.composite
def allocation_problems(draw, max_layers=12, max_span=10):
    """(scores, costs, budget, r_min, r_max, caps) with a feasible budget, sometimes generous."""
    n = draw(st.integers(1, max_layers))
    if draw(st.booleans()):
        costs = [SMOLLM2_COSTS[i % 5] for i in range(n)]
    else:
        costs = draw(st.lists(st.integers(1, 3000), min_size=n, max_size=n))
    # Few distinct score values so ties and equal-cost pairs are common.
    score = st.sampled_from([0.0, 0.05, 0.1, 0.1 + 1e-15, 0.3, 0.7, 1.0]) | st.floats(0, 1)
    scores = draw(st.lists(score, min_size=n, max_size=n))
    if draw(st.booleans()):
        r_min = draw(st.integers(0, 3))
        r_max = r_min + draw(st.integers(0, max_span))
        lo, hi = [r_min] * n, [r_max] * n
    else:
        lo = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        hi = [a + draw(st.integers(0, max_span)) for a in lo]
        r_min, r_max = lo, hi
    caps = None
    if draw(st.booleans()):
        caps = [a + draw(st.integers(0, max_span)) for a in lo]
        hi = [min(h, c) for h, c in zip(hi, caps)]
    floor = parameter_count(lo, costs)
    top = parameter_count(hi, costs)
    budget = floor + draw(st.integers(0, int(1.2 * (top - floor)) + 1))
    if draw(st.booleans()):
        budget += draw(st.floats(0, 0.999))
    return scores, costs, budget, r_min, r_max, caps, lo, hi


def live_bounds(scores, lo, hi):
    """Upper bounds allocate_ranks may fill: score-0 layers stay at r_min unless all scores are 0."""
    if max(scores) == 0:
        return list(hi)
    return [h if s > 0 else a for s, a, h in zip(scores, lo, hi)]


def unit_break(scores, held, band, l, j):
    """c at which allocate_ranks' map grants unit j (0-based above r_min) of layer l."""
    top = max(scores)
    s = scores[l] / top if top > 0 else 1.0
    if s == 0:
        return math.inf
    return min((j + 0.5) / (s * (1 + band) if j < held[l] else s), 1e300)


def check_allocation(ranks, scores, costs, budget, lo, hi, current=None, band=0.0):
    n = len(costs)
    spent = parameter_count(ranks, costs)
    live = live_bounds(scores, lo, hi)
    assert all(isinstance(r, int) for r in ranks)
    # (a) budget, (b) bounds, score-0 layers at r_min, (c) maximal: no live layer below its upper
    # bound fits one more unit.
    assert spent <= budget
    assert all(lo[l] <= ranks[l] <= live[l] for l in range(n)), (ranks, live)
    assert all(ranks[l] == live[l] or spent + costs[l] > budget for l in range(n)), (ranks, spent, budget)
    if current is None:
        # (d) of two layers alike in cost and bounds, the higher-scored one never has the lower rank.
        for i in range(n):
            for j in range(n):
                if (costs[i], lo[i], hi[i]) == (costs[j], lo[j], hi[j]) and scores[i] > scores[j]:
                    assert ranks[i] >= ranks[j], (i, j, ranks, scores)
    # (e) exchange: of two layers alike in cost and bounds, the one with fewer units would grant
    # its next unit no earlier than the other granted its last (held units counting boosted).
    held = [0] * n if current is None else [min(max(c, a), h) - a for c, a, h in zip(current, lo, live)]
    for i in range(n):
        for j in range(n):
            if (costs[i], lo[i], live[i]) == (costs[j], lo[j], live[j]) and ranks[i] < ranks[j]:
                nxt = unit_break(scores, held, band, i, ranks[i] - lo[i])
                last = unit_break(scores, held, band, j, ranks[j] - lo[j] - 1)
                assert nxt >= last, (i, j, ranks, scores, current)


@settings(max_examples=200, deadline=None)
@given(problem=allocation_problems())
def test_allocate_properties(problem):
    scores, costs, budget, r_min, r_max, caps, lo, hi = problem
    ranks = allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps)
    check_allocation(ranks, scores, costs, budget, lo, hi)
    assert allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps) == ranks


@settings(max_examples=200, deadline=None)
@given(
    problem=allocation_problems(),
    current=st.lists(st.integers(0, 14), min_size=12, max_size=12),
    band=st.sampled_from([0.0, 0.1, 0.25, 1.0, 1e6]),
)
def test_allocate_with_hysteresis_properties(problem, current, band):
    scores, costs, budget, r_min, r_max, caps, lo, hi = problem
    current = current[: len(costs)]
    ranks = allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps, current=current, dead_band=band)
    check_allocation(ranks, scores, costs, budget, lo, hi, current=current, band=band)
    # Stability: handing an allocation back as the current ranks returns it, for any dead-band.
    plain = allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps)
    assert allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps, current=plain, dead_band=band) == plain
    assert allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps, current=ranks, dead_band=band) == ranks


@settings(max_examples=200, deadline=None)
@given(
    problem=allocation_problems(),
    old=st.lists(st.integers(0, 14), min_size=12, max_size=12),
    band=st.sampled_from([0.0, 0.25, 1.0]),
    delta=st.integers(0, 3),
)
def test_allocate_hysteresis_completes_a_clipped_move(problem, old, band, delta):
    # Re-allocation t moves toward target T but Δmax clips the move; with the same scores,
    # re-allocation t + 1 (current = the clipped ranks) aims at the same T, so the move completes
    # instead of being frozen half-way by the dead-band.
    scores, costs, budget, r_min, r_max, caps, lo, hi = problem
    old = [min(max(o, a), h) for o, a, h in zip(old, lo, hi)]
    if parameter_count(old, costs) > budget:
        old = list(lo)
    kwargs = dict(r_min=r_min, r_max=r_max, caps=caps, dead_band=band)
    target = allocate_ranks(scores, costs, budget, current=old, **kwargs)
    clipped = clip_rank_change(old, target, costs, budget, delta)
    assert allocate_ranks(scores, costs, budget, current=clipped, **kwargs) == target


def test_allocate_hysteresis_ties_keep_the_current_ranks():
    # Equal scores and costs: without current ranks the lower index wins; with them, the holder.
    assert allocate_ranks([1.0, 1.0, 1.0], [10] * 3, 10) == [1, 0, 0]
    assert allocate_ranks([1.0, 1.0, 1.0], [10] * 3, 10, current=[0, 0, 1]) == [0, 0, 1]
    # A second unit is worth s / 1.5, another layer's first s / 0.5: a real gain, unless the band
    # covers the factor 3 (an exact tie at dead_band=2 goes to the holder).
    assert allocate_ranks([1.0, 1.0, 1.0], [10] * 3, 20, current=[0, 2, 0]) == [1, 1, 0]
    assert allocate_ranks([1.0, 1.0, 1.0], [10] * 3, 20, current=[0, 2, 0], dead_band=2.0) == [0, 2, 0]
    # Scores at M - 1 and M (flat spectra, noise): no move inside the band, a move outside it.
    assert allocate_ranks([7.0, 8.0], [10, 10], 10, current=[1, 0], dead_band=0.25) == [1, 0]
    assert allocate_ranks([7.0, 8.0], [10, 10], 10, current=[1, 0], dead_band=0.0) == [0, 1]
    assert allocate_ranks([4.0, 6.0], [10, 10], 10, current=[1, 0], dead_band=0.25) == [0, 1]


def test_allocate_hysteresis_band_is_relative_per_unit():
    # Layer 0 holds 3 units: its third is worth s0 / 2.5 (boosted by 1 + band); layer 1's first
    # s1 / 0.5. A unit moves only when s1 / 0.5 > (1 + band) · s0 / 2.5.
    costs, budget = [10, 10], 30
    assert allocate_ranks([1.0, 0.2], costs, budget) == [3, 0]  # 0.2 / 0.5 = 1 / 2.5: tie to lower index
    # Threshold at band 0.25: s1 > 1.25 · 0.5 / 2.5 = 0.25.
    assert allocate_ranks([1.0, 0.24], costs, budget, current=[3, 0], dead_band=0.0) == [2, 1]
    assert allocate_ranks([1.0, 0.24], costs, budget, current=[3, 0], dead_band=0.25) == [3, 0]
    assert allocate_ranks([1.0, 0.26], costs, budget, current=[3, 0], dead_band=0.25) == [2, 1]
    # Units outside the bounds are not held: r_max=2 caps what current=[3, 0] holds.
    assert allocate_ranks([1.0, 1.0], costs, budget, r_max=2, current=[3, 0], dead_band=10.0) == [2, 1]


def test_allocate_dead_layers_stay_at_r_min():
    # A score-0 layer (zero gradient) never receives leftover budget; the rest stays unspent.
    assert allocate_ranks([1, 0], [1000, 200], 3500) == [3, 0]
    assert allocate_ranks([1, 0], [1000, 200], 3500, r_min=1) == [3, 1]
    assert allocate_ranks([0.5, 0.0, 0.5], [10] * 3, 10**6, r_max=4) == [4, 0, 4]
    # Hysteresis does not keep a layer that went dead.
    assert allocate_ranks([1, 0], [10, 10], 100, r_max=4, current=[1, 3], dead_band=1e6) == [4, 0]
    # All-zero scores stay uniform (nothing to tell the layers apart).
    assert allocate_ranks([0, 0], [1000, 200], 3500) == [3, 2]


@settings(max_examples=80, deadline=None)
@given(problem=allocation_problems(max_layers=4, max_span=3))
def test_allocate_is_one_of_the_bruteforce_maximal_vectors(problem):
    scores, costs, budget, r_min, r_max, caps, lo, hi = problem
    ranks = allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps)
    live = live_bounds(scores, lo, hi)
    assert tuple(ranks) in reference.allocate_ranks_bruteforce(scores, costs, budget, lo, live)
    current = [max(0, r + (-1) ** l) for l, r in enumerate(ranks)]
    for band in (0.0, 0.5):
        moved = allocate_ranks(scores, costs, budget, r_min=r_min, r_max=r_max, caps=caps, current=current, dead_band=band)
        assert tuple(moved) in reference.allocate_ranks_bruteforce(scores, costs, budget, lo, live)


def test_allocate_proportional_when_budget_is_exact():
    assert allocate_ranks([0.5, 0.25, 0.25], [100] * 3, 800) == [4, 2, 2]
    assert allocate_ranks([2.0, 1.0, 1.0], [100] * 3, 800) == [4, 2, 2]  # scale-free
    assert allocate_ranks([0.5, 0.25, 0.25], [100] * 3, 800, r_min=1) == [4, 2, 2]
    # All-zero scores are uniform; the top-up spreads leftover units round-robin.
    assert allocate_ranks([0, 0, 0, 0], [10] * 4, 95) == [3, 2, 2, 2]


def test_allocate_adjacent_scores_order_by_score_not_index():
    a = 0.3
    b = math.nextafter(a, 1.0)
    assert allocate_ranks([b, a], [10, 10], 30) == [2, 1]
    assert allocate_ranks([a, b], [10, 10], 30) == [1, 2]


def test_allocate_smollm2_budget_and_extremes():
    costs = SMOLLM2_COSTS * 6
    scores = [((7 * i) % 11 + 1) / 11 for i in range(len(costs))]
    budget = 8 * sum(costs)
    ranks = allocate_ranks(scores, costs, budget, r_min=2, r_max=16)
    check_allocation(ranks, scores, costs, budget, [2] * len(costs), [16] * len(costs))
    assert parameter_count(ranks, costs) > budget - max(costs)
    assert allocate_ranks(scores, costs, 2 * sum(costs), r_min=2, r_max=16) == [2] * len(costs)
    assert allocate_ranks(scores, costs, 10**9, r_min=2, r_max=16) == [16] * len(costs)
    assert allocate_ranks(scores, costs, 10**9, r_max=16, caps=[5] * len(costs)) == [5] * len(costs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([1.0, 1.0], [10, 10], 30), dict(r_min=2), "raise the budget or lower r_min"),
        (([1.0, -1.0], [10, 10], 100), {}, ">= 0"),
        (([1.0, float("nan")], [10, 10], 100), {}, "finite"),
        (([1.0, 1.0], [10], 100), {}, "costs has 1 entries for 2 layers"),
        (([], [], 100), {}, "empty"),
        (([1.0, 1.0], [10, 10], 100), dict(r_min=3, r_max=2), "r_max"),
        (([1.0, 1.0], [10, 0], 100), {}, "positive"),
        (([1.0, 1.0], [10, -5], 100), {}, "positive"),
        (([1.0, 1.0], [10, 10], 100), dict(r_min=[1, 1, 1]), "r_min has 3 entries"),
        (([1.0, 1.0], [10, 10], 100), dict(r_min=2, caps=[4, 1]), "cap"),
        (([1.0, 1.0], [10, 10], 100), dict(r_max=2.5), "r_max must be an int"),
        (([1.0, 1.0], [10, 10], float("nan")), {}, "budget"),
        (([1.0, 1.0], [10, 10], -1), {}, "budget"),
        (([1.0, 1.0], [10, 10], 100), dict(current=[1]), "current has 1 entries"),
        (([1.0, 1.0], [10, 10], 100), dict(current=[1, -1]), "current must be >= 0"),
        (([1.0, 1.0], [10, 10], 100), dict(current=[1, 1], dead_band=-0.1), "dead_band must be >= 0"),
        (([1.0, 1.0], [10, 10], 100), dict(current=[1, 1], dead_band=float("inf")), "dead_band must be finite"),
    ],
)
def test_allocate_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks(*args, **kwargs)


@st.composite
def clip_problems(draw):
    n = draw(st.integers(1, 12))
    costs = draw(st.lists(st.sampled_from(SMOLLM2_COSTS) | st.integers(1, 50), min_size=n, max_size=n))
    old = draw(st.lists(st.integers(0, 16), min_size=n, max_size=n))
    new = draw(st.lists(st.integers(0, 16), min_size=n, max_size=n))
    p_old, p_new = parameter_count(old, costs), parameter_count(new, costs)
    # Mostly budgets both vectors satisfy (the controller's case), sometimes tighter than old.
    budget = max(p_old, p_new) + draw(st.integers(0, 3 * max(costs)))
    if draw(st.integers(0, 4)) == 0:
        budget = draw(st.integers(0, max(p_old, 1)))
    return old, new, costs, budget, draw(st.integers(0, 5))


@settings(max_examples=200, deadline=None)
@given(problem=clip_problems())
def test_clip_rank_change_properties(problem):
    old, new, costs, budget, delta = problem
    ranks = clip_rank_change(old, new, costs, budget, delta)
    n = len(old)
    spent = parameter_count(ranks, costs)
    assert all(isinstance(r, int) for r in ranks)
    assert all(abs(r - o) <= delta for r, o in zip(ranks, old))
    assert all(min(o, t) <= r <= max(o, t) for r, o, t in zip(ranks, old, new))
    # Decreases are always applied in full (up to delta).
    assert all(r == max(t, o - delta) for r, o, t in zip(ranks, old, new) if t < o)
    if parameter_count(old, costs) <= budget:
        assert spent <= budget
    else:
        assert spent <= parameter_count(old, costs)
        assert all(r <= o for r, o in zip(ranks, old)) or spent <= budget
    # Increases stop only at their clipped target or when the next unit does not fit.
    for l in range(n):
        if ranks[l] < min(new[l], old[l] + delta):
            assert spent + costs[l] > budget
    # Priority: a lower-priority layer got units only if every higher-priority, no-dearer one is full.
    rising = sorted((l for l in range(n) if new[l] > old[l]), key=lambda l: (old[l] - new[l], l))
    for a, i in enumerate(rising):
        for j in rising[a + 1:]:
            if ranks[j] > old[j] and costs[i] <= costs[j]:
                assert ranks[i] == min(new[i], old[i] + delta)


def test_clip_rank_change_examples():
    costs = SMOLLM2_COSTS
    budget = 4 * sum(costs)
    assert clip_rank_change([4] * 5, [8, 0, 2, 6, 4], costs, budget, 2) == [6, 2, 2, 4, 4]
    assert clip_rank_change([4] * 5, [8, 0, 2, 6, 4], costs, budget, 0) == [4] * 5
    assert clip_rank_change([4] * 5, [8, 0, 2, 6, 4], costs, 10**9, 10) == [8, 0, 2, 6, 4]
    # old over budget: decreases apply, increases do not.
    assert clip_rank_change([4, 4], [2, 8], [10, 10], 50, 1) == [3, 4]


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], [1], [10, 10], 100, 1), "new"),
        (([], [], [], 100, 1), "empty"),
        (([1, 2], [1, 2], [10, 0], 100, 1), "positive"),
        (([1, 2], [1, 2], [10, 10], 100, -1), "delta_max"),
        (([1, -2], [1, 2], [10, 10], 100, 1), "old must be >= 0"),
    ],
)
def test_clip_rank_change_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        clip_rank_change(*args)
