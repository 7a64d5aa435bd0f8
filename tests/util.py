"""Shared test helpers."""
import torch

# Relative-error tolerances per input dtype, for float32 accumulation against the float64 oracle.
SKETCH_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN in actual gives NaN)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def poisoned(shape, device="cpu") -> torch.Tensor:
    """float32 buffer full of NaN, so an element a kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


# The paper's dynamic GARD (spectral score, growth from zero), which the controller tests exercise;
# GARDConfig's defaults are the static recommended configuration. `window` stays per test.
PAPER_DYNAMIC = {"mode": "dynamic", "score": "spectral", "grow_init": "zero"}
