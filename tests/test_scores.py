"""Each layer score (gard_kernels/scores.py) against its definition, on windows whose answer is
known without the formula: sketches of gradients of known rank, matrices of known norms."""
import math

import pytest
import torch

from gard_kernels import GARD, GARDConfig
from gard_kernels.config import SCORES
from gard_kernels.scores import LAYER_SCORES, ScoreWindow
from gard_kernels.sketch import GradientSketch
from gard_kernels.spectra import effective_rank, gram_eigenvalues, summed_sketch_spectrum

from .models import batches, tiny_llama


def _window(steps, valid=None, alpha=0.9, measure="energy", generator=None):
    """ScoreWindow of one layer or several: steps is [L, M, k_out, k_in] (or [M, k_out, k_in])."""
    steps = torch.as_tensor(steps, dtype=torch.float64)
    if steps.dim() == 3:
        steps = steps[None]
    n, m, k_out, k_in = steps.shape
    sketches = steps.reshape(n, m, k_out * k_in)
    valid = torch.ones(n, m, dtype=torch.bool) if valid is None else torch.as_tensor(valid).reshape(n, m)
    eigs = gram_eigenvalues(sketches, valid)
    return ScoreWindow(sketches, valid, eigs, k_out, k_in, alpha, measure, generator)


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _sketches_of_rank(rank, steps, same_every_step, d_in=40, d_out=30, k=8, seed=0):
    """Per-step sketches (GradientSketch, reference backend) of gradients G_b = dY_b^T X_b of rank
    `rank`: the same G every step, or an independent one per step."""
    sketch = GradientSketch(d_in, d_out, k, k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    x = dy = None
    for _ in range(steps):
        if x is None or not same_every_step:
            # N = rank tokens: G = dY^T X has rank `rank` (generic X, dY).
            x, dy = torch.randn(rank, d_in, generator=gen), torch.randn(rank, d_out, generator=gen)
        out.append(sketch(x, dy, backend="reference").double())
    return torch.stack(out)  # [M, k, k]


def test_the_table_is_what_the_config_accepts():
    assert set(LAYER_SCORES) <= set(SCORES)
    with pytest.raises(ValueError, match="score must be one of"):
        GARDConfig(budget=100, score="nuclear")


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_update_rank_of_a_rank_r_gradient_is_r(rank):
    # The sketch of a rank-r matrix has rank r (k >= r, generic projections); alpha near 1 counts
    # every non-zero singular value and nothing of float32 rounding.
    w = _window(_sketches_of_rank(rank, steps=4, same_every_step=True), alpha=1 - 1e-6)
    assert float(LAYER_SCORES["update_rank"](w)[0]) == rank


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_spectral_counts_independent_steps_and_not_repeated_ones(steps):
    # Independent rank-1 steps are linearly independent sketches: the Gram has `steps` non-zero
    # eigenvalues; the same step repeated gives one.
    independent = _window(_sketches_of_rank(1, steps, same_every_step=False), alpha=1 - 1e-6)
    repeated = _window(_sketches_of_rank(1, steps, same_every_step=True), alpha=1 - 1e-6)
    assert float(LAYER_SCORES["spectral"](independent)[0]) == steps
    assert float(LAYER_SCORES["spectral"](repeated)[0]) == 1


def test_spectral_energy_threshold_on_a_known_gram():
    # Two orthogonal steps of norms 3 and 1: energies 9 and 1, so 90 % is reached by one direction.
    e = torch.zeros(2, 4, 4, dtype=torch.float64)
    e[0, 0, 0], e[1, 1, 1] = 3.0, 1.0
    assert float(LAYER_SCORES["spectral"](_window(e, alpha=0.9))[0]) == 1
    assert float(LAYER_SCORES["spectral"](_window(e, alpha=0.95))[0]) == 2


def test_update_nuclear_is_the_nuclear_norm_of_the_mean_step():
    # Steps M ± N average to M = U diag(3, 2, 1) V^T, whose nuclear norm is 6 whatever N is.
    u, v = _orthogonal(5, 1)[:, :3], _orthogonal(4, 2)[:, :3]
    mean = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T  # [5, 4]
    noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = _window(torch.stack([mean + noise, mean - noise]))
    assert float(LAYER_SCORES["update_nuclear"](w)[0]) == pytest.approx(6.0, rel=1e-12)


def test_grad_norm_is_the_rms_of_the_steps_frobenius_norms_and_skips_invalid_slots():
    steps = torch.zeros(3, 2, 2, dtype=torch.float64)
    steps[0, 0, 0] = 3.0  # ||S_0|| = 3
    steps[1] = torch.tensor([[0.0, 4.0], [0.0, 0.0]])  # ||S_1|| = 4
    steps[2, 1, 1] = 1e6  # left out by the mask
    w = _window(steps, valid=torch.tensor([True, True, False]))
    assert float(LAYER_SCORES["grad_norm"](w)[0]) == pytest.approx(math.sqrt((9 + 16) / 2), rel=1e-12)


def test_energy_rank_is_magnitude_times_diversity():
    # Two orthogonal steps of equal norm 2: RMS norm 2, Gram effective rank 2 (alpha 0.9).
    e = torch.zeros(2, 3, 3, dtype=torch.float64)
    e[0, 0, 1], e[1, 2, 0] = 2.0, 2.0
    assert float(LAYER_SCORES["energy_rank"](_window(e))[0]) == pytest.approx(4.0, rel=1e-12)


def test_uniform_and_random_baselines():
    w = _window(torch.zeros(3, 2, 2, 2), generator=torch.Generator().manual_seed(7))
    assert LAYER_SCORES["uniform"](w).tolist() == [1.0, 1.0, 1.0]
    first = LAYER_SCORES["random"](w)
    again = LAYER_SCORES["random"](_window(torch.zeros(3, 2, 2, 2), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(first, again) and bool(((first >= 0) & (first < 1)).all()) and first.unique().numel() == 3


def test_summed_sketch_spectrum_matches_a_float64_reference_and_skips_bad_slots():
    torch.manual_seed(3)
    k_out, k_in = 5, 3
    sketches = torch.randn(4, 6, k_out * k_in)  # [L, M, k]
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 2] = False
    sketches[2, 4, 7] = float("nan")  # a non-finite slot is left out, not propagated
    sigma2, count = summed_sketch_spectrum(sketches, valid, k_out, k_in)
    for layer in range(4):
        keep = [b for b in range(6) if valid[layer, b] and torch.isfinite(sketches[layer, b]).all()]
        total = sketches[layer, keep].double().sum(dim=0).view(k_out, k_in)
        expected = torch.linalg.svdvals(total).square()
        assert torch.allclose(sigma2[layer], expected, rtol=1e-10, atol=1e-12)
        assert count[layer] == len(keep)
    assert count.tolist() == [6, 5, 5, 6] and torch.isfinite(sigma2).all()
    with pytest.raises(ValueError, match="sketches must be"):
        summed_sketch_spectrum(sketches, valid, 4, 4)


def test_update_rank_sees_the_rank_of_the_sum_and_the_gram_does_not():
    """Steps along different directions: the Gram is full rank; steps along one direction with
    noise that cancels over the window: the sum is rank 1 while the Gram still sees M steps."""
    torch.manual_seed(0)
    k_out, k_in, m = 6, 6, 4
    u, v = torch.randn(k_out, 1), torch.randn(1, k_in)
    noise = torch.randn(m // 2, k_out, k_in)
    steps = torch.cat([noise, -noise]) + (u @ v)  # noise cancels in the sum
    sketches = steps.reshape(1, m, -1)
    sigma2, _ = summed_sketch_spectrum(sketches, None, k_out, k_in)
    assert float(effective_rank(sigma2, alpha=0.9)[0]) == 1.0
    assert float(effective_rank(gram_eigenvalues(sketches), alpha=0.9)[0]) >= 2.0


@pytest.mark.parametrize("score", ["update_rank", "update_nuclear", "energy_rank"])
def test_controller_records_the_tables_score_of_its_window(score):
    model = tiny_llama()
    gard = GARD(model, GARDConfig(budget=500, mode="static", score=score, window=3, k_in=4, k_out=4, backend="torch", grow_init="zero"))
    event = gard.profile(batches(3), steps=3)
    sketches, valid = gard.ring.window_sketches()
    window = ScoreWindow(sketches, valid, gram_eigenvalues(sketches, valid), 4, 4, 0.9, "energy")
    assert event["statistic"] == pytest.approx(LAYER_SCORES[score](window).tolist(), rel=1e-9)
    assert all(math.isfinite(s) for s in event["statistic"]) and gard.num_lora_params <= 500
