"""Batched gram_eigenvalues vs a per-layer loop of the same float64 computation."""
import torch

import gard_kernels as gk

from .conftest import tag
from .shapes import SPECTRA_SHAPE


def _sketches():
    s = SPECTRA_SHAPE
    return torch.randn(s["layers"], s["window"], s["k"])


def test_gram_eigenvalues_batched(benchmark):
    sketches = _sketches()
    benchmark.group = "gram_eigenvalues [210, 32, 256]"
    tag(benchmark, "candidate", target=5.0)
    benchmark(lambda: gk.gram_eigenvalues(sketches))


def test_gram_eigenvalues_per_layer_loop(benchmark):
    sketches = _sketches()
    benchmark.group = "gram_eigenvalues [210, 32, 256]"
    tag(benchmark, "baseline")

    def loop():
        out = []
        for layer in sketches:
            s = layer.double()
            out.append(torch.linalg.eigvalsh(s @ s.T).flip(-1).clamp_min(0))
        return torch.stack(out)

    benchmark(loop)
