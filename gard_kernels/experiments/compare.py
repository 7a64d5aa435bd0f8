"""Grids of runs over methods × budgets × seeds (and GARD ablation variants), resumable.

A Workspace holds what every run of a grid shares and is built once: the loaded model, the
packed data and the base model's validation perplexity. Each run writes
OUT/<method>_b<budget>_s<seed>[_<variant>]/metrics.json; a run whose metrics.json exists with
the same fingerprint is skipped, one with another fingerprint stops the grid (mixing settings
in one table would be wrong).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from .data import LMData, build_data, load_corpus
from .methods import METHODS, SPECTRAL_METHODS, GardSettings, adapted_costs, minimum_budget
from .models import ModelSource, device_name, load_model, tokenizer_encoder
from .runner import TrainSettings, evaluate, finetune, fingerprint, run_spec, write_json
from .stats import results_markdown, summarize, variant_label


class GridMismatchError(ValueError):
    """An output directory holds a finished run made with other settings."""


@dataclass
class Workspace:
    """What every run of a grid shares: model, data, and facts for metrics.json."""

    model: nn.Module
    data: LMData
    context: dict


def make_workspace(
    model: nn.Module,
    tokenizer,
    model_label: str,
    corpus: str,
    max_len: int,
    text_file: Optional[str] = None,
    val_fraction: float = 0.2,
    progress: bool = True,
) -> Workspace:
    """Pack the corpus with the model's tokenizer and collect the run-independent context."""
    documents = load_corpus(corpus, text_file)
    encode, eos = tokenizer_encoder(tokenizer)
    label = f"text:{text_file}" if text_file else corpus
    data = build_data(documents, encode, eos, max_len, label, val_fraction=val_fraction, progress=progress)
    context = {
        "model": model_label,
        "corpus": label,
        "device": device_name(),
        "data": {**data.stats, "val_topic_names": data.val_topics},
    }
    return Workspace(model, data, context)


def load_workspace(
    source: ModelSource,
    corpus: str,
    max_len: int,
    text_file: Optional[str] = None,
    progress: bool = True,
    byte_tokenizer: bool = False,
) -> Workspace:
    """Load the model (tqdm) and build the workspace."""
    model, tokenizer = load_model(source, progress=progress, byte_tokenizer=byte_tokenizer)
    return make_workspace(model, tokenizer, source.label, corpus, max_len, text_file, progress=progress)


def base_evaluation(ws: Workspace, train: TrainSettings, out_dir: Optional[Path], progress: bool = True) -> dict:
    """Validation PPL of the unadapted model on the run's eval subset; cached in OUT/base.json."""
    key = fingerprint({"model": ws.context["model"], "data": ws.context["data"], "eval_blocks": train.eval_blocks, "max_len": train.max_len})
    path = Path(out_dir) / "base.json" if out_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == key:
            ws.context["base_val_ppl"] = cached["ppl"]
            return cached
    tick = time.perf_counter()
    result = evaluate(ws.model, ws.data.eval_subset(train.eval_blocks), train.eval_batch_size, progress, desc="val base model")
    base = {
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "per_topic": result["per_topic"],
        "seconds": time.perf_counter() - tick,
        "fingerprint": key,
    }
    if path is not None:
        write_json(path, base)
    ws.context["base_val_ppl"] = base["ppl"]
    return base


@dataclass(frozen=True)
class GridRun:
    name: str
    method: str
    budget: int
    seed: int
    gard: GardSettings
    variant: dict


def plan_grid(
    methods: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    gard: GardSettings,
    alphas: Sequence[float] = (),
    ks: Sequence[int] = (),
    windows: Sequence[int] = (),
    ablation_seeds: Optional[Sequence[int]] = None,
    ablation_methods: Sequence[str] = ("gard-dynamic",),
    ablation_budgets: Optional[Sequence[int]] = None,
) -> list[GridRun]:
    """The runs of a grid: every method × budget × seed at the shared settings, then
    one-factor-at-a-time variants of α, k and M of the ablated spectral GARD methods.

    Args:
        ablation_seeds: seeds of the variant runs (default: `seeds`).
        ablation_methods: spectral GARD methods to ablate (default gard-dynamic).
        ablation_budgets: budgets of the variant runs (default: the largest of `budgets`).
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    runs = []
    for budget in budgets:
        for method in methods:
            for seed in seeds:
                runs.append(GridRun(f"{method}_b{budget}_s{seed}", method, budget, seed, gard, {}))
    variants = [("alpha", a) for a in alphas if a != gard.alpha]
    variants += [("k", k) for k in ks if k != gard.k]
    variants += [("M", m) for m in windows if m != gard.M]
    for method in ablation_methods if variants else ():
        if method not in SPECTRAL_METHODS:
            raise ValueError(f"ablation method {method!r} has no α / k / M; choose from {', '.join(SPECTRAL_METHODS)}")
    for field, value in variants:
        settings = dataclasses.replace(gard, **{field: value})
        for budget in ablation_budgets if ablation_budgets is not None else [max(budgets)]:
            for method in ablation_methods:
                for seed in ablation_seeds if ablation_seeds is not None else seeds:
                    name = f"{method}_b{budget}_s{seed}_{field}{value}"
                    runs.append(GridRun(name, method, budget, seed, settings, {field: value}))
    return runs


def check_budgets(model: nn.Module, runs: Sequence[GridRun]) -> None:
    """Raise ValueError (one line) for a budget below what a method needs on this model."""
    for run in runs:
        costs = adapted_costs(model, run.gard.target_modules)
        need = minimum_budget(run.method, costs, run.gard)
        if run.budget < need:
            raise ValueError(
                f"budget {run.budget} is below the minimum of {run.method} on this model ({need} parameters "
                f"for target modules {list(run.gard.target_modules)})"
            )


def run_grid(
    ws: Workspace,
    runs: Sequence[GridRun],
    train: TrainSettings,
    out_dir: Path,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Run (or skip, when finished with the same settings) every run; returns their metrics."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    check_budgets(ws.model, runs)
    results = []
    todo = []
    for run in runs:
        path = out_dir / run.name / "metrics.json"
        key = fingerprint(run_spec(run.method, run.budget, run.seed, train, run.gard, ws.context))
        if path.is_file():
            done = json.loads(path.read_text(encoding="utf-8"))
            if done.get("fingerprint") != key:
                raise GridMismatchError(
                    f"{path} was made with other settings; use another --out directory (or delete that run)"
                )
            results.append(done)
        else:
            todo.append(run)
    if len(todo) < len(runs):
        log(f"resuming: {len(runs) - len(todo)} of {len(runs)} runs already finished in {out_dir}")
    for run in tqdm(todo, desc="grid", unit="run", disable=not progress or len(todo) < 2):
        metrics = finetune(
            run.method, run.budget, run.seed, ws.model, ws.data, train, run.gard,
            out_dir=out_dir / run.name, context=ws.context, progress=progress, variant=run.variant,
        )
        log(
            f"{run.name}: val PPL {metrics['primary_metric']:.4f}, LoRA params mean {metrics['lora_params_mean']:.1f}, "
            f"{metrics['total_elapsed_seconds']:.1f} s"
        )
        results.append(metrics)
    return results


def write_results(out_dir: Path, runs: Sequence[dict], base: Optional[dict], settings: dict[str, Any], title: str) -> dict:
    """results.json (every run's headline numbers + aggregates) and results.md."""
    summary = summarize(runs, base)
    payload = {
        "settings": settings,
        "summary": summary,
        "runs": [
            {
                key: run.get(key)
                for key in (
                    "method", "budget", "seed", "variant", "primary_metric", "best_mean_val_ppl", "final_val_ppl",
                    "lora_params_mean", "lora_params_final", "total_elapsed_seconds", "final_ranks", "per_topic_val_ppl",
                )
            }
            for run in runs
        ],
    }
    write_json(Path(out_dir) / "results.json", payload)
    markdown = results_markdown(summary, title)
    (Path(out_dir) / "results.md").write_text(markdown, encoding="utf-8")
    return summary


__all__ = [
    "GridMismatchError",
    "GridRun",
    "Workspace",
    "base_evaluation",
    "check_budgets",
    "load_workspace",
    "make_workspace",
    "plan_grid",
    "run_grid",
    "variant_label",
    "write_results",
]
