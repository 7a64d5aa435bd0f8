"""Layer scores: what each GARDConfig.score computes from a window of sketches.

One function per score, all with the same signature, in one table (`LAYER_SCORES`) that
GARDConfig validates `score` against and the controller calls. Each returns one non-negative
statistic per layer; the controller smooths it (dynamic mode) and allocates ranks in proportion
to it (allocate.allocate_ranks). The scores that grade each rank unit of a layer separately
("marginal_gain", "marginal_gain_sq") are not here: they read the gain probe, not the sketches,
and have their own allocation rule (marginal_gain.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .spectra import effective_rank, summed_sketch_spectrum

__all__ = ["LAYER_SCORES", "ScoreWindow"]


@dataclass(frozen=True)
class ScoreWindow:
    """The inputs every layer score reads (all on the CPU).

    Attributes:
        sketches: [L, M, k_out * k_in] the window's per-step sketches S_b of each layer.
        valid: [L, M] bool, the slots the score may use (equalised across layers).
        eigs: [L, M] float64 Gram eigenvalues of the valid slots (spectra.gram_eigenvalues).
        k_out, k_in: the sketch's matrix shape.
        alpha, measure: the effective-rank threshold and measure (GARDConfig).
        generator: the run's generator ("random" draws from it).
    """

    sketches: torch.Tensor
    valid: torch.Tensor
    eigs: torch.Tensor
    k_out: int
    k_in: int
    alpha: float = 0.9
    measure: str = "energy"
    generator: Optional[torch.Generator] = None

    @property
    def num_layers(self) -> int:
        return self.eigs.shape[0]

    def valid_count(self) -> torch.Tensor:
        """[L] float64 number of valid slots, at least 1 (an empty window divides by 1)."""
        return self.valid.sum(dim=1).clamp_min(1).to(torch.float64)


def spectral(w: ScoreWindow) -> torch.Tensor:
    """The paper's score: effective rank of the Gram spectrum (how different the window's steps are)."""
    return effective_rank(w.eigs, alpha=w.alpha, measure=w.measure)


def grad_norm(w: ScoreWindow) -> torch.Tensor:
    """RMS over the window of the gradient's Frobenius norm, sqrt(mean_b ||S_b||^2).

    E||S_b||^2 = ||G_b||^2 for the sketch, and the Gram's trace is Σ_b ||S_b||^2.
    """
    return (w.eigs.sum(dim=1) / w.valid_count()).sqrt()


def update_rank(w: ScoreWindow) -> torch.Tensor:
    """Effective rank of the summed sketch S = Σ_b S_b: how many directions the update itself has."""
    sigma2, _ = summed_sketch_spectrum(w.sketches, w.valid, w.k_out, w.k_in)
    return effective_rank(sigma2, alpha=w.alpha, measure=w.measure)


def update_nuclear(w: ScoreWindow) -> torch.Tensor:
    """Nuclear norm of the mean sketch Σ_b S_b / V (V valid slots): magnitude and diversity of the mean update."""
    sigma2, count = summed_sketch_spectrum(w.sketches, w.valid, w.k_out, w.k_in)
    return sigma2.sqrt().sum(dim=1) / count.clamp_min(1.0)


def energy_rank(w: ScoreWindow) -> torch.Tensor:
    """grad_norm × spectral: gradient magnitude weighted by the diversity of the steps."""
    return grad_norm(w) * spectral(w)


def uniform(w: ScoreWindow) -> torch.Tensor:
    """Every layer scores 1 (the uniform baseline through the same machinery)."""
    return torch.ones(w.num_layers, dtype=torch.float64)


def random(w: ScoreWindow) -> torch.Tensor:
    """Uniform(0, 1) per layer from the run's generator (the random baseline)."""
    return torch.rand(w.num_layers, generator=w.generator, dtype=torch.float64)


# name -> score. The order is the order GARDConfig lists them in its messages.
LAYER_SCORES: dict[str, Callable[[ScoreWindow], torch.Tensor]] = {
    "spectral": spectral,
    "grad_norm": grad_norm,
    "uniform": uniform,
    "random": random,
    "update_rank": update_rank,
    "update_nuclear": update_nuclear,
    "energy_rank": energy_rank,
}
