import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gard_kernels import reference
from gard_kernels.spectra import (
    MEASURES,
    SpectrumWarning,
    effective_rank,
    equalize_valid_slots,
    gram_eigenvalues,
    spectral_scores,
)
from tests.util import rel_error

# Relative error of float64 eigenvalues against the numpy oracle: both are backward stable.
EIG_TOLERANCE = 1e-10


def _planted(ranks, window, k, gen, noise=1e-5, scale=1.0):
    """[L, window, k] float32 sketches whose layer l spans exactly ranks[l] directions (+ noise).

    Coefficients have orthonormal columns times singular values in [1, 2], so every planted
    direction carries at least 1/(4r) of the energy and alpha = 0.99 must count all of them.
    """
    layers = []
    for r in ranks:
        coeff, _ = torch.linalg.qr(torch.randn(window, r, generator=gen, dtype=torch.float64))  # [M, r]
        basis, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))  # [k, r]
        sigma = 1.0 + torch.rand(r, generator=gen, dtype=torch.float64)
        layers.append(coeff * sigma @ basis.T + noise * torch.randn(window, k, generator=gen, dtype=torch.float64))
    return (scale * torch.stack(layers)).to(torch.float32)


@pytest.mark.parametrize("shape", [(5, 7, 123), (1, 2, 1), (3, 16, 40), (2, 9, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gram_eigenvalues_match_reference(shape, dtype):
    x = torch.randn(shape).to(dtype)
    valid = torch.rand(shape[:2]) > 0.3
    for mask in (None, valid):
        got = gram_eigenvalues(x, mask)
        want = reference.gram_eigenvalues(x, mask)
        assert got.dtype == torch.float64 and got.shape == shape[:2]
        assert rel_error(got, want) < EIG_TOLERANCE
        assert (got >= 0).all() and (got[:, :-1] >= got[:, 1:]).all()


def test_gram_eigenvalues_single_layer_shape():
    x = torch.randn(6, 11)
    got = gram_eigenvalues(x, torch.ones(6, dtype=torch.bool))
    assert got.shape == (6,)
    assert rel_error(got, reference.gram_eigenvalues(x[None])[0]) < EIG_TOLERANCE


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_planted_rank_recovered(scale):
    gen = torch.Generator().manual_seed(3)
    ranks = [1, 2, 3, 5, 8]
    sketches = _planted(ranks, window=12, k=123, gen=gen, scale=scale)
    eigs = gram_eigenvalues(sketches)
    assert torch.isfinite(eigs).all()
    assert effective_rank(eigs, alpha=0.99).tolist() == [float(r) for r in ranks]
    assert reference.effective_rank(eigs, alpha=0.99).tolist() == [float(r) for r in ranks]


def test_exact_rank_spectrum_not_pushed_up_by_rounding():
    # 0.3 + 0.3 + 0.3 rounds below 0.9 * 1.0 in float64.
    assert effective_rank(torch.tensor([0.3, 0.3, 0.3, 0.1]), alpha=0.9).item() == 3
    assert effective_rank(torch.tensor([[0.1] * 10]), alpha=0.7).item() == 7


def test_invalid_slot_is_same_as_dropping_it():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 123, generator=gen)
    valid = torch.ones(5, 7, dtype=torch.bool)
    valid[2, 3] = False
    poisoned = x.clone()
    poisoned[2, 3] = float("nan")
    poisoned[4, 0, 7] = float("inf")  # non-finite rows are dropped even when marked valid
    got = gram_eigenvalues(poisoned, valid)
    dropped_2 = gram_eigenvalues(torch.cat([x[2, :3], x[2, 4:]])[None])[0]
    dropped_4 = gram_eigenvalues(x[4, 1:][None])[0]
    # The excluded slot leaves one eigenvalue that is zero up to the solver's rounding.
    assert rel_error(got[2, :6], dropped_2) < EIG_TOLERANCE and got[2, 6] < 1e-12 * got[2].sum()
    assert rel_error(got[4, :6], dropped_4) < EIG_TOLERANCE and got[4, 6] < 1e-12 * got[4].sum()
    assert rel_error(got[[0, 1, 3]], gram_eigenvalues(x[[0, 1, 3]])) < EIG_TOLERANCE
    # Without a mask the NaN slot is still excluded.
    assert rel_error(gram_eigenvalues(poisoned)[2, :6], dropped_2) < EIG_TOLERANCE


def test_all_zero_and_all_invalid_layers():
    x = torch.randn(4, 6, 10)
    x[1] = 0
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[3] = False
    eigs = gram_eigenvalues(x, valid)
    assert not torch.isnan(eigs).any()
    assert eigs[1].abs().sum() == 0 and eigs[3].abs().sum() == 0
    for measure in MEASURES:
        r = effective_rank(eigs, measure=measure)
        assert r[1] == 0 and r[3] == 0 and (r[[0, 2]] > 0).all()


def test_fallback_when_batched_solver_raises(monkeypatch):
    x = torch.randn(5, 7, 20)
    want = gram_eigenvalues(x)
    original = torch.linalg.eigvalsh

    def batched_fails(a, *args, **kwargs):
        if a.dim() == 3:
            raise torch.linalg.LinAlgError("simulated solver failure")
        return original(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", batched_fails)
    with pytest.warns(SpectrumWarning, match="retrying per layer"):
        got = gram_eigenvalues(x)
    assert rel_error(got, want) < EIG_TOLERANCE


def test_fallback_when_batched_solver_returns_nan(monkeypatch):
    x = torch.randn(3, 5, 20)
    want = gram_eigenvalues(x)
    original = torch.linalg.eigvalsh

    def layer1_nan(a, *args, **kwargs):
        out = original(a, *args, **kwargs)
        if a.dim() == 3:
            out[1, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.linalg, "eigvalsh", layer1_nan)
    with pytest.warns(SpectrumWarning, match=r"layers \[1\]"):
        got = gram_eigenvalues(x)
    assert rel_error(got, want) < EIG_TOLERANCE


def test_zeros_when_every_solver_fails(monkeypatch):
    def always_fails(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(torch.linalg, "eigvalsh", always_fails)
    with pytest.warns(SpectrumWarning) as record:
        got = gram_eigenvalues(torch.randn(3, 4, 8))
    assert sum("using zero eigenvalues" in str(w.message) for w in record) == 3
    assert torch.equal(got, torch.zeros(3, 4, dtype=torch.float64))
    assert effective_rank(got).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
def test_effective_rank_matches_reference(measure, alpha):
    gen = torch.Generator().manual_seed(5)
    # Spectra with very different decay, unsorted, plus one all-zero and one single-spike row.
    decay = torch.linspace(0.5, 8, 7, dtype=torch.float64)[:, None]
    eigs = torch.rand(7, 9, generator=gen, dtype=torch.float64) ** decay
    eigs[5] = 0
    eigs[6] = 0
    eigs[6, 4] = 3.0
    got = effective_rank(eigs, alpha=alpha, measure=measure)
    want = reference.effective_rank(eigs, alpha=alpha, measure=measure)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[5] == 0 and got[6] == 1


@st.composite
def _spectra(draw):
    """[L, M] lists of non-negative eigenvalues with small L, M and wide dynamic range."""
    m = draw(st.integers(1, 9))
    row = st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=m, max_size=m)
    return draw(st.lists(row, min_size=1, max_size=4))


@settings(max_examples=60, deadline=None)
@given(eigs=_spectra(), alpha=st.floats(0.01, 0.99), measure=st.sampled_from(MEASURES))
def test_effective_rank_matches_reference_hypothesis(eigs, alpha, measure):
    e = torch.tensor(eigs, dtype=torch.float64)
    got = effective_rank(e, alpha=alpha, measure=measure)
    want = reference.effective_rank(e, alpha=alpha, measure=measure)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    m = e.shape[1]
    assert ((got >= 0) & (got <= m + 1e-9)).all()


def test_effective_rank_input_checks():
    with pytest.raises(ValueError, match="energy, entropy, stable, participation"):
        effective_rank(torch.ones(3), measure="nuclear")
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            effective_rank(torch.ones(3), alpha=alpha)
    with pytest.raises(ValueError, match="NaN or Inf"):
        effective_rank(torch.tensor([1.0, float("nan")]))
    assert effective_rank(torch.tensor([2.0, 1.0])).dim() == 0


def test_measures_on_flat_spectrum():
    flat = torch.ones(2, 6, dtype=torch.float64)
    for measure in MEASURES:
        assert effective_rank(flat, alpha=0.99, measure=measure).tolist() == pytest.approx([6.0, 6.0])


def test_spectral_scores():
    torch.testing.assert_close(spectral_scores([1.0, 3.0, 0.0]), torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    torch.testing.assert_close(spectral_scores(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    assert math.isclose(spectral_scores(torch.rand(9)).sum().item(), 1.0)
    for bad in ([1.0, -1.0], [float("nan")], []):
        with pytest.raises(ValueError):
            spectral_scores(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gram_eigenvalues_on_gpu_matches_reference():
    x = torch.randn(5, 7, 123, device="cuda")
    valid = torch.rand(5, 7, device="cuda") > 0.3
    got = gram_eigenvalues(x, valid)
    assert got.device.type == "cuda"
    assert rel_error(got, reference.gram_eigenvalues(x, valid)) < EIG_TOLERANCE


def test_equalize_valid_slots_keeps_the_newest_common_count():
    t, f = True, False
    valid = torch.tensor(
        [
            [t, t, t, t, t, t],  # 6 valid: keeps its newest 3
            [t, f, t, f, f, t],  # 3 valid: sets V = 3
            [f, t, t, f, t, t],  # 4 valid: drops its oldest
            [f, f, f, f, f, t],  # 1 valid: below minimum, kept as is, does not set V
        ]
    )
    expected = torch.tensor(
        [
            [f, f, f, t, t, t],
            [t, f, t, f, f, t],
            [f, f, t, f, t, t],
            [f, f, f, f, f, t],
        ]
    )
    assert torch.equal(equalize_valid_slots(valid), expected)
    # Equal counts (the usual case), or no layer with 2 valid slots: unchanged.
    assert torch.equal(equalize_valid_slots(valid[1:2]), valid[1:2])
    assert torch.equal(equalize_valid_slots(valid[3:]), valid[3:])
    with pytest.raises(ValueError, match=r"\[L, M\]"):
        equalize_valid_slots(valid[0])


def test_equalized_window_scores_a_noise_layer_like_its_clean_twin():
    # Two layers with i.i.d. Gaussian sketches (flat spectra); layer 1 lost half its slots. On the
    # equalised mask both spectra come from 4 sketches, so their effective ranks agree; on the raw
    # mask layer 1 would score about half of layer 0.
    generator = torch.Generator().manual_seed(0)
    sketches = torch.randn(2, 8, 256, generator=generator)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, ::2] = False
    raw = effective_rank(gram_eigenvalues(sketches, valid))
    fair = effective_rank(gram_eigenvalues(sketches, equalize_valid_slots(valid)))
    assert raw[0] >= 7.0 and raw[1] == 4.0, raw
    assert fair.tolist() == [4.0, 4.0]
