"""metrics.json: what one finished run reports, built from the training loop's trace."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from .gard_method import GardMethod
from .memory import PeakMemory
from .method import Method, MethodRun

if TYPE_CHECKING:
    from .settings import TrainSettings


@dataclass
class Trace:
    """What the training loop records for metrics.json.

    Attributes:
        names: adapted modules, in model order; blocks: their transformer blocks (None: none).
        history: one record per step; evals: evaluations during training ({"step", **evaluate()}).
        depth: transformer blocks the backward pass reached, per step.
    """

    names: list[str]
    blocks: list[Optional[int]]
    start: float = field(default_factory=time.perf_counter)
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    params_sum: int = 0
    profile_seconds: float = 0.0
    # Peak resident memory of the profile (method.prepare) and of the optimizer steps (memory.py).
    profile_memory: PeakMemory = field(default_factory=PeakMemory)
    train_memory: PeakMemory = field(default_factory=PeakMemory)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def top_block(self) -> int:
        known = [b for b in self.blocks if b is not None]
        return max(known) if known else 0

    def backprop_depth(self, reached: Sequence[str]) -> int:
        """Blocks from the earliest of the `reached` modules to the top (0: none reached)."""
        blocks = [self.blocks[self.names.index(n)] for n in reached if n in self.names]
        blocks = [b for b in blocks if b is not None]
        return self.top_block + 1 - min(blocks) if blocks else 0


def run_metrics(
    run: MethodRun, method: Method, trace: Trace, test: Optional[dict], train: "TrainSettings", context: dict,
    variant: Optional[dict],
) -> dict[str, Any]:
    """The metrics dict of metrics.json (the caller adds the run's fingerprint).

    best_mean_val_ppl (= primary_metric, the number choices are made on), test_ppl (final model),
    train_seconds (profiling + optimizer steps, no evaluation), tokens_per_second (training tokens
    / train_seconds), backprop_blocks (how many transformer blocks the backward pass reaches: from
    the earliest adapted module with rank > 0, or capturing, to the top; max and mean over steps)
    and everything else.

    Args:
        run: what the method was built from; method: the trained method.
        test: the final model's test evaluation (None: not evaluated).
    """
    from .. import __version__

    budget, seed = run.budget, run.seed
    metrics = {
        **_headline(method, trace, test, train),
        "method": run.name,
        "budget": budget,
        "seed": seed,
        "variant": dict(variant or {}),
        "hyperparameters": {**train.to_dict(), "budget": budget, "seed": seed, **run.settings.options(run.name)},
        "method_details": method.details,
        "device": context.get("device"),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        **{key: context.get(key) for key in ("model", "corpus", "data", "base_val_ppl", "base_test_ppl")},
        "adapted_modules": trace.names,
        "final_ranks": method.ranks(),
    }
    best = min(trace.evals, key=lambda e: e["ppl"])
    metrics.update({
        "val_history": [{"step": e["step"], "ppl": e["ppl"], "tokens": e["tokens"]} for e in trace.evals],
        "per_topic_val_ppl": best["per_topic"],
        "per_topic_tokens": best["per_topic_tokens"],
        "per_topic_test_ppl": None if test is None else test["per_topic"],
        "reallocations": method.reallocations() if isinstance(method, GardMethod) else [],
        "history": trace.history,
    })
    return metrics


def _headline(method: Method, trace: Trace, test: Optional[dict], train: "TrainSettings") -> dict[str, Any]:
    """The numbers tables compare: perplexities, parameter counts, cost."""
    best = min(trace.evals, key=lambda e: e["ppl"])
    train_tokens = train.steps * train.batch_size * train.max_len
    depth = trace.depth
    return {
        "primary_metric": best["ppl"],
        "best_mean_val_ppl": best["ppl"],
        "final_val_ppl": trace.evals[-1]["ppl"],
        "test_ppl": None if test is None else test["ppl"],
        "test_tokens": None if test is None else test["tokens"],
        "best_step": best["step"],
        "lora_params_mean": trace.params_sum / max(train.steps, 1),
        "lora_params_final": method.num_params(),
        "total_elapsed_seconds": time.perf_counter() - trace.start,
        "train_seconds": trace.train_seconds,
        "profile_seconds": trace.profile_seconds,
        # Peak RSS of the profile and of the optimizer steps (memory.PeakMemory; None off Linux).
        **trace.profile_memory.to_dict("profile"),
        **trace.train_memory.to_dict("train"),
        "eval_seconds": trace.eval_seconds,
        "train_tokens": train_tokens,
        "tokens_per_second": train_tokens / trace.train_seconds if trace.train_seconds > 0 else None,
        "backprop_blocks_max": max(depth) if depth else 0,
        "backprop_blocks_mean": sum(depth) / len(depth) if depth else 0.0,
        "blocks_total": trace.top_block + 1,
    }
