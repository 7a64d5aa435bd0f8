"""The GARD scores computed from the summed window sketch and from magnitude x diversity."""
import math

import pytest
import torch

from gard_kernels import GARD, GARDConfig
from gard_kernels.spectra import effective_rank, gram_eigenvalues, summed_sketch_spectrum

from .models import batches, tiny_llama


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
def test_controller_scores_match_their_definitions(score):
    model = tiny_llama()
    gard = GARD(model, GARDConfig(budget=500, mode="static", score=score, window=3, k_in=4, k_out=4, backend="torch", grow_init="zero"))
    event = gard.profile(batches(3), steps=3)
    sketches, valid = gard.ring.window_sketches()
    eigs = gram_eigenvalues(sketches, valid)
    sigma2, count = summed_sketch_spectrum(sketches, valid, 4, 4)
    if score == "update_rank":
        expected = effective_rank(sigma2, alpha=0.9)
    elif score == "update_nuclear":
        expected = sigma2.sqrt().sum(dim=1) / count
    else:
        expected = (eigs.sum(dim=1) / valid.sum(dim=1)).sqrt() * effective_rank(eigs, alpha=0.9)
    assert event["statistic"] == pytest.approx(expected.tolist(), rel=1e-9)
    assert all(math.isfinite(s) for s in event["statistic"]) and gard.num_lora_params <= 500
