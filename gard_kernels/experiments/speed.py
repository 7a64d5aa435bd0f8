"""Training-step speed of each precision mode (float32, bf16 autocast, torch.compile), with a
perplexity check: the same run (method, budget, seed, batches) in every mode."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .runner import finetune
from .settings import GardSettings, TrainSettings

# Mode name -> TrainSettings fields.
MODES = {
    "fp32": {"precision": "fp32", "compile": False},
    "bf16": {"precision": "bf16", "compile": False},
    "fp32+compile": {"precision": "fp32", "compile": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
}


def measure_modes(ws, modes: Sequence[str], method: str, budget: int, seed: int, train: TrainSettings,
                  gard: GardSettings, warm_steps: int = 2, progress: bool = False) -> list[dict[str, Any]]:
    """Run one fine-tune per mode; tokens/s of the steady state (after `warm_steps`, which hold
    torch.compile's compilation) and of the whole run, and validation / test PPL (evaluated in
    float32 in every mode).

    Returns:
        One record per mode: mode, tokens_per_second_steady, tokens_per_second, seconds_per_step,
        first_steps_seconds, val_ppl, test_ppl, delta_val_ppl_vs_first (relative to the first mode).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if train.steps <= warm_steps:
        raise ValueError(f"steps ({train.steps}) must exceed warm_steps ({warm_steps}) to measure a steady state")
    records = []
    for mode in modes:
        settings = dataclasses.replace(train, **MODES[mode])
        metrics = finetune(method, budget, seed, ws.model, ws.data, settings, gard, context=ws.context, progress=progress)
        elapsed = [h["elapsed"] for h in metrics["history"]]
        tokens = settings.batch_size * settings.max_len
        steady = elapsed[-1] - elapsed[warm_steps - 1]
        records.append({
            "mode": mode,
            "tokens_per_second_steady": (len(elapsed) - warm_steps) * tokens / steady,
            "tokens_per_second": metrics["tokens_per_second"],
            "seconds_per_step": steady / (len(elapsed) - warm_steps),
            "first_steps_seconds": elapsed[warm_steps - 1],
            "val_ppl": metrics["best_mean_val_ppl"],
            "test_ppl": metrics["test_ppl"],
        })
    for record in records:
        record["delta_val_ppl_vs_first"] = record["val_ppl"] / records[0]["val_ppl"] - 1.0
    return records


def speed_markdown(records: Sequence[dict]) -> str:
    """The records as a Markdown table."""
    lines = [
        "| mode | tokens/s (steady) | s / step | first steps s | tokens/s (whole run) | val PPL | test PPL | val PPL vs first mode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        test = "n/a" if r["test_ppl"] is None else f"{r['test_ppl']:.4f}"
        lines.append(
            f"| {r['mode']} | {r['tokens_per_second_steady']:.0f} | {r['seconds_per_step']:.2f} | {r['first_steps_seconds']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {r['val_ppl']:.4f} | {test} | {100 * r['delta_val_ppl_vs_first']:+.2f} % |"
        )
    return "\n".join(lines) + "\n"
