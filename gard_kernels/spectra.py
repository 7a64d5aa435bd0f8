"""Gradient spectra (paper §3.2): Gram eigenvalues of each layer's sketch window, effective ranks,
and normalised importance scores.

All layers go through one batched float64 eigvalsh; M is tens, so the cost is negligible next to
a training step, and float64 keeps the small tail eigenvalues that effective ranks look at.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

MEASURES = ("energy", "entropy", "stable", "participation")

# Relative slack on the energy threshold: cumsum rounding (~M * 1e-16) must not turn an exact
# rank-r spectrum into r + 1; 1e-10 is far below any meaningful change of alpha.
_ENERGY_RTOL = 1e-10


class SpectrumWarning(RuntimeWarning):
    """An eigensolver failed and a fallback (CPU, or zeros) was used."""


def gram_eigenvalues(sketches: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvalues of the Gram matrix C_l = S_l^T S_l per layer, descending, >= 0, float64.

    S_l holds the layer's valid sketches as columns. The paper's 1/M factor is left out: every
    effective-rank measure is scale-invariant, and the trace then is Σ_b ||S_b||² over valid slots.
    Excluded slots (valid False, or holding NaN/Inf) are zeroed, so each contributes one zero
    eigenvalue and nothing else; the result equals that of the window without them. All-zero layers
    give all-zero eigenvalues. Solver failures fall back to the CPU, then to zeros, with a
    SpectrumWarning; this never raises for numerical reasons.

    Args:
        sketches: [L, M, k] (or [M, k] for one layer), any float dtype, any device.
        valid: [L, M] (or [M]) bool mask of usable slots; default None (all slots usable).
    Returns:
        [L, M] (or [M]) float64 on the sketches' device.
    """
    if sketches.dim() not in (2, 3):
        raise ValueError(f"sketches must be [L, M, k] or [M, k], got shape {tuple(sketches.shape)}")
    single = sketches.dim() == 2
    x = sketches[None] if single else sketches
    if valid is not None:
        if tuple(valid.shape) != tuple(sketches.shape[:-1]):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(sketches.shape[:-1])}")
        valid = valid[None] if single else valid
    if not x.is_floating_point():
        raise ValueError(f"sketches must be floating point, got {x.dtype}")

    # Squares of float32 (or narrower) values cannot overflow or underflow in float64; a float64
    # input is first divided by its layer's largest finite entry so the same holds for it.
    amax = None
    if x.dtype == torch.float64:
        amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=(-2, -1))  # [L]
        amax = torch.where(amax > 0, amax, 1.0)
        x = x / amax[:, None, None]
    x = x.to(torch.float64)  # [L, M, k]
    gram = x @ x.transpose(-1, -2)  # [L, M, M]
    # A slot with NaN/Inf anywhere has a non-finite diagonal entry, and Gram entry (i, j) involves
    # only slots i and j: masking rows and columns of the Gram drops exactly the excluded slots,
    # without another pass over the sketches.
    keep = torch.isfinite(gram.diagonal(dim1=-2, dim2=-1))  # [L, M]
    if valid is not None:
        keep = keep & valid.to(device=x.device, dtype=torch.bool)
    pair = keep[:, :, None] & keep[:, None, :]
    # where, not multiply: NaN * 0 is NaN.
    gram = torch.where(pair, gram, 0.0)
    gram = 0.5 * (gram + gram.transpose(-1, -2))
    # Trace normalisation puts every layer's spectrum in [0, 1]: one well-scaled batched solve.
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # [L]
    trace = torch.where(trace > 0, trace, 1.0)
    eigs = _eigvalsh_with_fallback(gram / trace[:, None, None])  # [L, M] ascending
    scale = trace if amax is None else trace * amax.square()
    eigs = eigs.flip(-1).clamp_min(0.0) * scale[:, None]
    return eigs[0] if single else eigs


def equalize_valid_slots(valid: torch.Tensor, minimum: int = 2) -> torch.Tensor:
    """Keep every layer's newest V valid slots, V the smallest valid count among the layers.

    A spectrum of V sketches has at most V non-zero eigenvalues, so every effective-rank measure
    is bounded by V, and a noise-like (flat) spectrum's effective rank grows about linearly in V:
    a layer that lost slots to non-finite gradients would be scored lower for that alone.
    Dividing by V would in turn over-score a layer whose true rank is below V (its effective rank
    does not depend on V). Scoring every layer on the same number of sketches is fair to both,
    at the price of ignoring some finite slots of the other layers. Layers with fewer than
    `minimum` valid slots have no usable spectrum, do not lower V, and keep what they have.

    Args:
        valid: [L, M] bool, slots oldest first (as GradientRing.window_sketches returns them).
        minimum: smallest count that sets V; default 2.
    Returns:
        [L, M] bool, a subset of valid (valid itself when nothing changes).
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be [L, M], got shape {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    count = valid.sum(dim=1)  # [L]
    usable = count >= minimum
    if not bool(usable.any()):
        return valid
    target = int(count[usable].min())
    if bool((count[usable] == target).all()):
        return valid
    # Valid slots at or after each position, counted from the newest end.
    from_newest = valid.flip(-1).to(torch.int64).cumsum(-1).flip(-1)  # [L, M]
    keep = valid & (from_newest <= target)
    return torch.where(usable[:, None], keep, valid)


def _eigvalsh_with_fallback(mats: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of symmetric [L, M, M] float64; failed layers retried on CPU, else zeros."""
    try:
        eigs = torch.linalg.eigvalsh(mats)
        bad = ~torch.isfinite(eigs).all(dim=-1)
        reason = "non-finite eigenvalues"
    # Any solver error (LinAlgError, cuSOLVER/MAGMA RuntimeError) must not end a training run.
    except Exception as err:  # noqa: BLE001
        eigs = torch.zeros(mats.shape[:-1], dtype=mats.dtype, device=mats.device)
        bad = torch.ones(mats.shape[0], dtype=torch.bool, device=mats.device)
        reason = f"{type(err).__name__}: {err}"
    if not bool(bad.any()):
        return eigs
    layers = bad.nonzero().flatten().tolist()
    warnings.warn(
        f"batched eigvalsh failed for layers {layers} ({reason}); retrying per layer on the CPU",
        SpectrumWarning,
        stacklevel=3,
    )
    for layer in layers:
        try:
            values = torch.linalg.eigvalsh(mats[layer].cpu())
            if not bool(torch.isfinite(values).all()):
                raise RuntimeError("non-finite eigenvalues")
        except Exception as err:  # noqa: BLE001
            warnings.warn(
                f"eigvalsh failed for layer {layer} on the CPU ({type(err).__name__}: {err}); "
                "using zero eigenvalues (effective rank 0) for it",
                SpectrumWarning,
                stacklevel=3,
            )
            values = torch.zeros(mats.shape[-1], dtype=mats.dtype)
        eigs[layer] = values.to(eigs.device)
    return eigs


def effective_rank(
    eigs: torch.Tensor | Sequence[float], alpha: float = 0.9, measure: str = "energy"
) -> torch.Tensor:
    """Effective rank of each layer's spectrum; 0 for an all-zero spectrum.

    Measures, with p = λ / Σλ:
      energy: min k in 1..M with Σ_{i<=k} λ_i >= α Σλ, λ descending (paper §3.2).
      entropy: exp(-Σ p log p) (Roy & Vetterli, 2007).
      stable: Σλ / λ_max.
      participation: (Σλ)² / Σλ².
    Eigenvalues are sorted descending here and tiny negatives (solver rounding) clamped to 0.

    Args:
        eigs: [L, M] or [M] eigenvalues, e.g. from gram_eigenvalues.
        alpha: energy fraction in (0, 1); default 0.9. Used by "energy" only, validated always.
        measure: one of MEASURES; default "energy".
    Returns:
        [L] float64 (a 0-d tensor for [M] input).
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lam = torch.as_tensor(eigs, dtype=torch.float64)
    if lam.dim() not in (1, 2) or lam.shape[-1] == 0:
        raise ValueError(f"eigs must be [L, M] or [M] with M >= 1, got shape {tuple(lam.shape)}")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("eigs contain NaN or Inf")
    single = lam.dim() == 1
    lam = lam[None] if single else lam
    lam = lam.clamp_min(0.0).sort(dim=-1, descending=True).values  # [L, M]
    total = lam.sum(dim=-1)  # [L]
    nonzero = total > 0
    safe_total = torch.where(nonzero, total, 1.0)

    if measure == "energy":
        cum = lam.cumsum(dim=-1)  # [L, M]
        threshold = alpha * total * (1.0 - _ENERGY_RTOL)
        # cum is non-decreasing, so the count of prefixes below the threshold is the answer - 1.
        rank = (cum < threshold[:, None]).sum(dim=-1).to(torch.float64) + 1.0
    elif measure == "entropy":
        p = lam / safe_total[:, None]
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
        rank = torch.exp(-plogp.sum(dim=-1))
    else:
        # Relative to λ_max (always > 0 when total > 0) so Σλ² cannot overflow.
        lam_max = torch.where(nonzero, lam[:, 0], 1.0)
        q = lam / lam_max[:, None]
        if measure == "stable":
            rank = q.sum(dim=-1)
        else:
            rank = q.sum(dim=-1).square() / torch.where(nonzero, q.square().sum(dim=-1), 1.0)
    rank = torch.where(nonzero, rank, 0.0)
    return rank[0] if single else rank


def spectral_scores(r_eff: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Normalised importance scores s_l = r_l / Σ r (paper §3.2); uniform when all r are 0.

    Args:
        r_eff: [L] non-negative finite effective ranks.
    Returns:
        [L] float64 summing to 1.
    """
    r = torch.as_tensor(r_eff, dtype=torch.float64)
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"r_eff must be a non-empty [L] vector, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
        raise ValueError("r_eff must be finite and >= 0")
    total = r.sum()
    if float(total) == 0.0:
        return torch.full_like(r, 1.0 / r.numel())
    return r / total


def summed_sketch_spectrum(sketches: torch.Tensor, valid: torch.Tensor | None, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values of each layer's summed window sketch S = Σ_b S_b, and the count.

    The Gram spectrum measures how different the window's steps are; the spectrum of the sum
    measures how many directions the accumulated update itself has (a sketch of Σ_b G_b). Slots
    with valid False or any NaN/Inf entry are left out of the sum.

    Args:
        sketches: [L, M, k_out * k_in] window sketches (any float dtype, any device).
        valid: [L, M] bool, or None (every slot usable).
        k_out, k_in: the sketch's matrix shape.
    Returns:
        (sigma2 [L, min(k_out, k_in)] float64 descending, on the CPU; count [L] float64 >= 0).
    """
    if sketches.dim() != 3 or sketches.shape[-1] != k_out * k_in:
        raise ValueError(f"sketches must be [L, M, {k_out * k_in}], got shape {tuple(sketches.shape)}")
    x = sketches.detach().to("cpu", torch.float64)  # [L, M, k]
    keep = torch.isfinite(x).all(dim=-1)  # [L, M]
    if valid is not None:
        keep = keep & valid.to("cpu", torch.bool)
    total = torch.where(keep[..., None], x, 0.0).sum(dim=1).view(-1, k_out, k_in)  # [L, k_out, k_in]
    # Scale each layer to unit max entry so the SVD is well conditioned; undo on the squares.
    amax = total.abs().amax(dim=(-2, -1))
    amax = torch.where(amax > 0, amax, 1.0)
    sigma = torch.linalg.svdvals(total / amax[:, None, None])  # [L, min(k_out, k_in)] descending
    return (sigma * amax[:, None]).square(), keep.sum(dim=1).to(torch.float64)
