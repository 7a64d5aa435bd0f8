"""Float64 oracles for every op in the package. Slow and obvious on purpose: tests compare each
fast path against these. Nothing here is used on a hot path."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def sketch(x: torch.Tensor, dy: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """S = P_out^T G P_in with G = dY^T X materialised, all in float64.

    Args:
        x: [..., d_in] layer inputs.
        dy: [..., d_out] gradients of the layer outputs (same leading dims as x).
        p_in: [d_in, k_in] projection of the input side.
        p_out: [d_out, k_out] projection of the output side.
    Returns:
        [k_out, k_in] float64.
    """
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    dy64 = dy.reshape(-1, dy.shape[-1]).to(torch.float64)
    grad = dy64.T @ x64  # [d_out, d_in]
    return p_out.to(torch.float64).T @ grad @ p_in.to(torch.float64)


def gram_eigenvalues(sketches: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvalues of the Gram C_l = S_l^T S_l per layer from the valid, finite slots only, float64.

    Args:
        sketches: [L, M, k] any float dtype.
        valid: [L, M] bool; default None (every finite slot is used).
    Returns:
        [L, M] float64, descending, padded with zeros for the slots that were left out.
    """
    x = sketches.detach().cpu().to(torch.float64).numpy()
    mask = None if valid is None else valid.detach().cpu().numpy()
    num_layers, window, _ = x.shape
    out = torch.zeros(num_layers, window, dtype=torch.float64)
    for layer in range(num_layers):
        rows = [
            x[layer, j]
            for j in range(window)
            if (mask is None or mask[layer, j]) and np.isfinite(x[layer, j]).all()
        ]
        if not rows:
            continue
        s = np.stack(rows, axis=1)  # [k, n]
        gram = s.T @ s  # [n, n]
        values = np.sort(np.linalg.eigvalsh(gram))[::-1].clip(min=0.0)
        out[layer, : len(rows)] = torch.from_numpy(values.copy())
    return out


def effective_rank(eigs, alpha: float = 0.9, measure: str = "energy") -> torch.Tensor:
    """Effective rank per layer with plain loops (see gard_kernels.spectra.effective_rank).

    Args:
        eigs: [L, M] eigenvalues (any order; negatives clamped to 0).
        alpha: energy fraction in (0, 1); default 0.9.
        measure: "energy", "entropy", "stable" or "participation"; default "energy".
    Returns:
        [L] float64.
    """
    rows = torch.as_tensor(eigs, dtype=torch.float64).tolist()
    out = []
    for row in rows:
        lam = sorted((max(v, 0.0) for v in row), reverse=True)
        total = math.fsum(lam)
        if total == 0.0:
            out.append(0.0)
        elif measure == "energy":
            # Same 1e-10 relative slack as the fast path (absorbs cumulative-sum rounding).
            rank, cum = len(lam), 0.0
            for i, v in enumerate(lam):
                cum += v
                if cum >= alpha * total * (1.0 - 1e-10):
                    rank = i + 1
                    break
            out.append(float(rank))
        elif measure == "entropy":
            h = -math.fsum(v / total * math.log(v / total) for v in lam if v > 0)
            out.append(math.exp(h))
        elif measure == "stable":
            out.append(total / lam[0])
        elif measure == "participation":
            # (Σλ)² / Σλ² = 1 / Σ p² with p = λ / Σλ: no underflow of λ² for tiny spectra.
            out.append(1.0 / math.fsum((v / total) ** 2 for v in lam))
        else:
            raise ValueError(f"unknown measure {measure!r}")
    return torch.tensor(out, dtype=torch.float64)


def allocate_ranks_bruteforce(scores, costs, budget, r_min=0, r_max=8) -> set[tuple[int, ...]]:
    """All maximal feasible rank vectors: within bounds and budget, and no layer can take +1.

    Enumerates every rank vector, so only for tiny cases (a few layers, small r_max). Scores do
    not change the set; they are accepted so calls mirror allocate_ranks.

    Args:
        scores: [L] (unused).
        costs: [L] positive ints.
        budget: parameter budget.
        r_min: scalar or [L]; default 0.
        r_max: scalar or [L]; default 8.
    Returns:
        set of [L] int tuples (empty when even r_min does not fit).
    """
    n = len(costs)
    lo = list(r_min) if isinstance(r_min, (list, tuple)) else [r_min] * n
    hi = list(r_max) if isinstance(r_max, (list, tuple)) else [r_max] * n
    maximal = set()
    for ranks in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi))):
        spent = sum(r * c for r, c in zip(ranks, costs))
        if spent > budget:
            continue
        if all(ranks[l] == hi[l] or spent + costs[l] > budget for l in range(n)):
            maximal.add(ranks)
    return maximal
