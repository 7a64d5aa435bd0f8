"""The marginal-gain allocator (marginal_gain.py) and its gain estimate (lora/gain_probe.py)."""
import itertools

import pytest
import torch

from gard_kernels import GARD, GARDConfig
from gard_kernels.lora.gain_probe import GainProbe
from gard_kernels.marginal_gain import allocate_marginal
from gard_kernels.sketch import GradientSketch

from .models import batches, tiny_llama


# --- the allocator against a brute-force optimum ---------------------------------------------


def _brute_force(gains, costs, budget, lo, hi):
    best = -1.0
    for ranks in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(sum(g[:r]) for g, r in zip(gains, ranks)))
    return best


def _value(gains, ranks):
    return sum(sum(g[:r]) for g, r in zip(gains, ranks))


@pytest.mark.parametrize("case", range(60))
def test_greedy_is_within_one_unit_of_the_brute_force_optimum(case):
    gen = torch.Generator().manual_seed(case)
    n = 3
    costs = [int(c) for c in torch.randint(3, 12, (n,), generator=gen)]  # odd costs included
    caps = [int(c) for c in torch.randint(1, 5, (n,), generator=gen)]
    r_min = int(torch.randint(0, 2, (1,), generator=gen))
    r_max = 3
    hi = [max(r_min, min(r_max, c)) for c in caps]
    caps = [max(c, r_min) for c in caps]
    gains = [sorted(torch.rand(6, generator=gen).tolist(), reverse=True) for _ in range(n)]
    floor = r_min * sum(costs)
    budget = floor + int(torch.randint(0, 40, (1,), generator=gen))
    ranks = allocate_marginal(gains, costs, budget, r_min=r_min, r_max=r_max, caps=caps)
    assert sum(r * c for r, c in zip(ranks, costs)) <= budget
    assert all(r_min <= r <= h for r, h in zip(ranks, hi))
    # Maximal: no further positive unit fits.
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert all(ranks[l] == hi[l] or spent + costs[l] > budget for l in range(n))
    optimum = _brute_force(gains, costs, budget, [r_min] * n, hi)
    got = _value(gains, ranks)
    assert got <= optimum + 1e-12
    # Greedy by worth per parameter is the fractional optimum up to the first unit that did not fit,
    # so it is never worse than OPT minus the largest gain of a unit it left out.
    left_out = [g[r] for g, r, h in zip(gains, ranks, hi) if r < h]
    assert got >= optimum - max(left_out, default=0.0) - 1e-12


@pytest.mark.parametrize("case", range(20))
def test_greedy_is_optimal_when_every_layer_costs_the_same(case):
    gen = torch.Generator().manual_seed(100 + case)
    gains = [sorted(torch.rand(4, generator=gen).tolist(), reverse=True) for _ in range(3)]
    budget = int(torch.randint(0, 13, (1,), generator=gen)) * 7 + 3
    ranks = allocate_marginal(gains, [7, 7, 7], budget, r_max=4)
    assert _value(gains, ranks) == pytest.approx(_brute_force(gains, [7, 7, 7], budget, [0] * 3, [4] * 3), abs=1e-12)


def test_worth_is_per_parameter_and_zero_gains_are_never_bought():
    # Layer 0's unit gains more but costs 10 times more: per parameter, layer 1 wins.
    assert allocate_marginal([[2.0], [1.0]], [100, 10], 100, r_max=1) == [0, 1]
    assert allocate_marginal([[2.0], [1.0]], [100, 10], 110, r_max=1) == [1, 1]
    # The integer top-up: the best unit does not fit, the next one that does is taken.
    assert allocate_marginal([[5.0, 4.0], [1.0]], [60, 30], 100, r_max=2) == [1, 1]
    # r_min units are granted whatever their gain; gain 0 is never bought.
    assert allocate_marginal([[0.0, 0.0], [3.0, 0.0]], [10, 10], 100, r_min=1, r_max=2) == [1, 1]
    assert allocate_marginal([[0.0, 0.0], [3.0, 2.0]], [10, 10], 100, r_min=1, r_max=2) == [1, 2]


def test_bad_gains_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="non-increasing"):
        allocate_marginal([[1.0, 2.0]], [10], 100)
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_marginal([[-1.0]], [10], 100)
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_marginal([[1.0]], [10], 5, r_min=1)


# --- the gain estimate ------------------------------------------------------------------------


def _flat_gradient(d_out=192, d_in=576, s=2.0, seed=0):
    """(X, dY) whose gradient dY^T X = s U V^T has 192 equal singular values s."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_out, generator=gen, dtype=torch.float64))
    dy = (s * u).T.contiguous()  # [N = d_out, d_out]
    x = v.T.contiguous()  # [N, d_in]
    return x.float(), dy.float()


def _probe(steps_of_half, p, seed=0):
    """Run the three passes of a GainProbe over steps_of_half = [[(x, dy), ...], [(x, dy), ...]]."""
    d_in, d_out = steps_of_half[0][0][0].shape[-1], steps_of_half[0][0][1].shape[-1]
    probe = GainProbe(d_in, d_out)
    probe.start(p, torch.Generator().manual_seed(seed))
    for phase in range(3):
        if phase:
            probe.next_pass()
        for h, steps in enumerate(steps_of_half):
            probe.set_half(h)
            for x, dy in steps:
                probe.accumulate(x, dy)
    probe.stop()
    return probe


def test_the_sketch_is_biased_on_a_flat_spectrum_and_the_probe_is_not():
    x, dy = _flat_gradient()
    s, total = 2.0, 192 * 2.0**2  # true singular values and ||G||_F^2
    # The 16 x 16 sketch: its top 4 of 16 singular values hold most of its energy ...
    sketch = GradientSketch(576, 192, 16, 16, seed=3)(x, dy, backend="reference").double()
    sigma2 = torch.linalg.svdvals(sketch).square()
    sketch_share = float(sigma2[:4].sum() / sigma2.sum())
    # ... where the gradient's top 4 of 192 hold 4 / 192 = 2 %.
    probe = _probe([[(x, dy)], [(x, dy)]], p=12)
    values = probe.singular_values(0, steps=1)
    gains = probe.gains((1, 1))
    probe_share = float(values[:4].square().sum() / total)
    assert sketch_share > 0.4, sketch_share
    assert probe_share == pytest.approx(4 / 192, rel=1e-3)
    assert torch.allclose(values[:8], torch.full((8,), s, dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(gains[:8], torch.full((8,), s, dtype=torch.float64), rtol=1e-4)


def _noisy_steps(count, d_in, d_out, signal=None, seed=0):
    """`count` steps whose gradient is `signal` (or 0) plus independent unit Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(count):
        # G = dY^T X with X = I: dY^T is the gradient itself.
        g = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        if signal is not None:
            g = g + signal
        steps.append((torch.eye(d_in), g.T.float().contiguous()))
    return steps


def test_cross_fitting_removes_the_noise_floor():
    d_in, d_out, n = 96, 64, 8
    steps = _noisy_steps(n, d_in, d_out, seed=1)
    probe = _probe([steps[: n // 2], steps[n // 2:]], p=12)
    gains = probe.gains((n // 2, n // 2))
    # Every singular value of a short mean of noise sits at the noise floor (~(sqrt(64) + sqrt(96)) / sqrt(n))...
    mean = sum(dy.double().T for _, dy in steps) / n
    floor = float(torch.linalg.svdvals(mean)[0])
    assert floor > 4.0
    # ... the cross-fitted gains do not.
    assert float(gains.max()) < 0.3 * floor, (gains, floor)


def test_a_planted_low_rank_signal_is_found_under_noise():
    d_in, d_out, n = 96, 64, 8
    gen = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(d_out, 2, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, 2, generator=gen, dtype=torch.float64))
    # Singular values 15 and 10 against a noise floor of about 6 for the mean of 8 steps (and 9
    # for a half): clearly above the detection threshold, not far above the floor.
    signal = u @ torch.diag(torch.tensor([15.0, 10.0], dtype=torch.float64)) @ v.T
    steps = _noisy_steps(n, d_in, d_out, signal=signal, seed=2)
    gains = _probe([steps[: n // 2], steps[n // 2:]], p=12).gains((n // 2, n // 2))
    mean = sum(dy.double().T for _, dy in steps) / n
    uncrossed = torch.linalg.svdvals(mean)
    assert float(uncrossed[2]) > 5.0  # what the third unit would be worth without cross-fitting
    # The float64 reference: exact SVDs of the two dense half means, each measured on the other.
    halves = [sum(dy.double().T for _, dy in part) / len(part) for part in (steps[: n // 2], steps[n // 2:])]
    exact = torch.zeros(2, dtype=torch.float64)
    for h in range(2):
        u_h, _, vh_h = torch.linalg.svd(halves[h])
        exact += (u_h[:, :2].T @ halves[1 - h] @ vh_h[:2].T).diagonal() / 2
    # Directions found under noise are worth somewhat less than the planted ones, and the probe
    # (three passes, 12 columns, never forming G) finds nearly what the dense SVDs find.
    assert exact[0] == pytest.approx(15.0, rel=0.15) and exact[1] == pytest.approx(10.0, rel=0.2)
    assert gains[:2].tolist() == pytest.approx(exact.tolist(), rel=0.1)
    assert float(gains[2:].max()) < 0.2 * 10.0
    # The allocator gives the signal layer its 2 directions and the pure-noise layer next to it almost nothing.
    noise = _probe([steps[:0] + _noisy_steps(4, d_in, d_out, seed=7), _noisy_steps(4, d_in, d_out, seed=8)], p=12)
    ranks = allocate_marginal([gains.tolist(), noise.gains((4, 4)).tolist()], [160, 160], 160 * 3, r_max=8)
    assert ranks[0] >= 2 and ranks[0] > ranks[1]


def test_probe_refuses_out_of_order_use():
    probe = GainProbe(4, 3)
    with pytest.raises(RuntimeError, match="start"):
        probe.accumulate(torch.zeros(2, 4), torch.zeros(2, 3))
    probe.start(2)
    with pytest.raises(RuntimeError, match="pass 3"):
        probe.gains((1, 1))


# --- through the controller -------------------------------------------------------------------


def _config(**overrides):
    base = dict(budget=1500, mode="static", score="marginal_gain", window=4, k_in=4, k_out=4, backend="torch",
                grow_init="zero", r_max=4)
    base.update(overrides)
    return GARDConfig(**base)


@pytest.mark.parametrize("score", ["marginal_gain", "marginal_gain_sq"])
def test_static_profile_allocates_by_marginal_gain_within_the_budget(score):
    model = tiny_llama()
    gard = GARD(model, _config(score=score))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-3)
    gard.attach_optimizer(opt)
    before = [p.grad for p in model.parameters()]
    event = gard.profile(batches(4), steps=4)
    assert gard.num_lora_params <= 1500 and sum(event["ranks"]) > 0
    assert [p.grad for p in model.parameters()] == before
    gains = event["gains"]
    assert len(gains) == len(gard.names) and all(list(g) == sorted(g, reverse=True) for g in gains)
    if score == "marginal_gain":
        expected = allocate_marginal(gains, gard.manager.costs, 1500, r_min=0, r_max=4, caps=gard.manager.caps)
    else:
        expected = allocate_marginal([[v * v for v in g] for g in gains], gard.manager.costs, 1500, r_max=4,
                                     caps=gard.manager.caps)
    assert event["ranks"] == expected


def test_profile_takes_exactly_window_batches_for_two_passes():
    model = tiny_llama()
    gard = GARD(model, _config())
    data = iter(batches(6))
    gard.profile(data, steps=4)
    assert len(list(data)) == 2


def test_marginal_gain_needs_profile_and_static_mode():
    with pytest.raises(ValueError, match="static"):
        _config(mode="dynamic")
    model = tiny_llama()
    gard = GARD(model, _config())
    with pytest.raises(RuntimeError, match="profile"):
        gard.step()
    assert gard.step_count == 0


def test_gora_init_after_marginal_gain_grows_from_the_last_batch_only(monkeypatch):
    from gard_kernels.lora.range_finder import RangeFinder

    seen = []
    original = RangeFinder.top_input_directions

    def spy(self, *args, **kwargs):
        seen.append(self.tokens)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RangeFinder, "top_input_directions", spy)
    model = tiny_llama()
    gard = GARD(model, _config(grow_init="gora"))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-3)
    gard.attach_optimizer(opt)
    gard.profile(batches(4, batch=2, length=12), steps=4)
    grown = [layer for layer in gard.manager.layers if layer.rank > 0]
    # The range finder saw one batch (2 x 12 tokens), not the probe's three passes over four.
    assert grown and seen and set(seen) == {24}
    assert all(bool(torch.isfinite(layer.lora_B.detach()).all()) for layer in grown)
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in grown)


def test_a_non_finite_profile_batch_is_refused_not_turned_into_rank_zero():
    # One NaN batch of 4 leaves 3 finite sketch steps (enough for min_valid_steps) but poisons the
    # probe of its half: refused, GARD as it was, and a retry on finite batches allocates.
    model = tiny_llama()
    gard = GARD(model, _config())
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-3))
    ranks = dict(gard.ranks)

    def loss(m, batch):
        value = m(**batch).loss
        return value * float("nan") if batch is poisoned else value

    data = batches(4)
    poisoned = data[1]
    with pytest.raises(ValueError, match="needs finite gradients on every profile batch"):
        gard.profile(data, steps=4, loss_fn=loss)
    assert gard.ranks == ranks and not gard.allocated and gard.step_count == 0
    event = gard.profile(batches(4, seed=5), steps=4)
    assert sum(event["ranks"]) > 0
