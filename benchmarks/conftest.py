"""Benchmark harness: pytest-benchmark on CPU; each benchmark tags its group's baseline and the
ratio target so benchmarks/report.py can write ratios measured side by side in one run."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tag(benchmark, role: str, target: float | None = None) -> None:
    """Mark a benchmark as the group's "baseline" or a "candidate" with an optional speedup target."""
    benchmark.extra_info["role"] = role
    if target is not None:
        benchmark.extra_info["target_speedup"] = target
