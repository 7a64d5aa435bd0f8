"""End to end without a model: X, dY -> sketch -> ring -> spectra -> effective rank -> ranks."""
import pytest
import torch

import gard_kernels as gk


def _planted_steps(rank: int, steps: int, d_in: int, d_out: int, generator: torch.Generator):
    """Per-step (X, dY) whose gradients G_b = dY_b^T X_b lie in span{u_j v_j^T : j < rank}.

    Token j carries x = v_j and dy = c_bj u_j, so G_b = sum_j c_bj u_j v_j^T. The coefficient
    matrix C [steps, rank] has orthonormal columns, so the r non-zero eigenvalues are equal.
    """
    v = torch.randn(rank, d_in, generator=generator)
    u = torch.randn(rank, d_out, generator=generator)
    coeffs, _ = torch.linalg.qr(torch.randn(steps, rank, generator=generator, dtype=torch.float64))
    for b in range(steps):
        yield v.clone(), u * coeffs[b].float()[:, None]


@pytest.mark.parametrize("rank, k", [(1, 4), (3, 4), (4, 8), (6, 5)])
def test_planted_rank_is_recovered_through_the_sketch(rank, k):
    assert k * k >= 4 * rank
    window, d_in, d_out = 16, 96, 80
    generator = torch.Generator().manual_seed(rank * 100 + k)
    sketch = gk.GradientSketch(d_in, d_out, k_in=k, k_out=k, seed=rank)
    ring = gk.SketchRing(num_layers=1, window=window, k=k * k)
    for x, dy in _planted_steps(rank, window, d_in, d_out, generator):
        sketch(x, dy, out=ring.current(0).view(k, k))
        ring.advance()
    sketches, valid = ring.window_sketches()
    eigs = gk.gram_eigenvalues(sketches, valid)
    assert gk.effective_rank(eigs, alpha=0.99).item() == rank


def test_more_diverse_gradients_get_more_rank():
    """Two layers with planted ranks 1 and 6 under a budget that fits 7 units: 1 vs 6 split."""
    window, d, k = 12, 64, 8
    generator = torch.Generator().manual_seed(0)
    sketches = [gk.GradientSketch(d, d, k, k, seed=s) for s in (1, 2)]
    ring = gk.SketchRing(num_layers=2, window=window, k=k * k)
    streams = [_planted_steps(r, window, d, d, generator) for r in (1, 6)]
    for _ in range(window):
        for layer, (sk, stream) in enumerate(zip(sketches, streams)):
            x, dy = next(stream)
            sk(x, dy, out=ring.current(layer).view(k, k))
        ring.advance()
    r_eff = gk.effective_rank(gk.gram_eigenvalues(*ring.window_sketches()), alpha=0.99)
    assert r_eff.tolist() == [1.0, 6.0]
    ranks = gk.allocate_ranks(gk.spectral_scores(r_eff).tolist(), costs=[2 * d, 2 * d], budget=7 * 2 * d, r_max=8)
    assert ranks == [1, 6]
