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
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .data import LMData, build_data, load_corpus
from .methods import METHODS, SPECTRAL_METHODS, GardSettings, adapted_costs, minimum_budget
from .models import ModelSource, device_name, load_model, tokenizer_encoder
from .runner import TrainSettings, evaluate, finetune, fingerprint, run_spec, write_json
from .stats import REFERENCE_METHODS, best_rate, results_markdown, summarize, variant_label


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
    test_fraction: float = 0.2,
) -> Workspace:
    """Pack the corpus with the model's tokenizer and collect the run-independent context."""
    documents = load_corpus(corpus, text_file)
    encode, eos = tokenizer_encoder(tokenizer)
    label = f"text:{text_file}" if text_file else corpus
    data = build_data(documents, encode, eos, max_len, label, val_fraction=val_fraction, progress=progress, test_fraction=test_fraction)
    context = {
        "model": model_label,
        "corpus": label,
        "device": device_name(next(model.parameters()).device),
        "data": {**data.stats, "val_topic_names": data.val_topics, "test_topic_names": data.test_topics},
    }
    return Workspace(model, data, context)


def load_workspace(
    source: ModelSource,
    corpus: str,
    max_len: int,
    text_file: Optional[str] = None,
    progress: bool = True,
    byte_tokenizer: bool = False,
    test_fraction: float = 0.2,
    device: Optional[torch.device] = None,
    check: Optional[Callable[[nn.Module], None]] = None,
) -> Workspace:
    """Load the model (tqdm) onto `device` (default: the CPU) and build the workspace
    (test_fraction 0: the earlier two-way split). check(model), if given, runs right after the
    load, before the data is packed."""
    model, tokenizer = load_model(source, progress=progress, byte_tokenizer=byte_tokenizer, device=device)
    if check is not None:
        check(model)
    return make_workspace(model, tokenizer, source.label, corpus, max_len, text_file, progress=progress, test_fraction=test_fraction)


def base_evaluation(ws: Workspace, train: TrainSettings, out_dir: Optional[Path], progress: bool = True) -> dict:
    """Validation and test PPL of the unadapted model on the runs' subsets; cached in OUT/base.json."""
    key = fingerprint({
        "model": ws.context["model"], "data": ws.context["data"], "eval_blocks": train.eval_blocks,
        "test_blocks": train.test_blocks, "max_len": train.max_len,
    })
    path = Path(out_dir) / "base.json" if out_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == key:
            ws.context["base_val_ppl"] = cached["ppl"]
            ws.context["base_test_ppl"] = cached.get("test_ppl")
            return cached
    tick = time.perf_counter()
    result = evaluate(ws.model, ws.data.eval_subset(train.eval_blocks), train.eval_batch_size, progress, desc="val base model")
    test = None
    if train.test_blocks != 0 and ws.data.test_blocks:
        test = evaluate(ws.model, ws.data.eval_subset(train.test_blocks, "test"), train.eval_batch_size, progress, desc="test base model")
    base = {
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "per_topic": result["per_topic"],
        "test_ppl": None if test is None else test["ppl"],
        "test_tokens": None if test is None else test["tokens"],
        "test_per_topic": None if test is None else test["per_topic"],
        "seconds": time.perf_counter() - tick,
        "fingerprint": key,
    }
    if path is not None:
        write_json(path, base)
    ws.context["base_val_ppl"] = base["ppl"]
    ws.context["base_test_ppl"] = base["test_ppl"]
    return base


@dataclass(frozen=True)
class GridRun:
    """One run of a grid. lr None: the grid's TrainSettings.lr."""

    name: str
    method: str
    budget: int
    seed: int
    gard: GardSettings
    variant: dict
    lr: Optional[float] = None

    def train(self, train: TrainSettings) -> TrainSettings:
        """The run's training settings: the grid's, at this run's learning rate."""
        return train if self.lr is None else dataclasses.replace(train, lr=self.lr)


# Ablation axes: (name in run names, GARDConfig fields the value sets).
ABLATIONS = {"alpha": ("alpha",), "k": ("k_in", "k_out"), "window": ("window",)}


def plan_grid(
    methods: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    gard: GardSettings,
    alphas: Sequence[float] = (),
    ks: Sequence[int] = (),
    windows: Sequence[int] = (),
    ablation_seeds: Optional[Sequence[int]] = None,
    ablation_methods: Sequence[str] = ("gard-paper-dynamic",),
    ablation_budgets: Optional[Sequence[int]] = None,
    lr: Optional[float] = None,
) -> list[GridRun]:
    """The runs of a grid: every method × budget × seed at the shared settings, then
    one-factor-at-a-time variants of α, k (k_in = k_out) and the window M of the ablated
    spectral GARD methods.

    Args:
        ablation_seeds: seeds of the variant runs (default: `seeds`).
        ablation_methods: spectral GARD methods to ablate (default gard-paper-dynamic).
        ablation_budgets: budgets of the variant runs (default: the largest of `budgets`).
        lr: learning rate of every run (None: the grid's TrainSettings.lr); with it, run names
            end in _lr<lr>.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    tag = "" if lr is None else f"_lr{lr:g}"
    runs = []
    for budget in budgets:
        for method in methods:
            for seed in seeds:
                runs.append(GridRun(f"{method}_b{budget}_s{seed}{tag}", method, budget, seed, gard, {}, lr))
    variants = []
    for axis, values in (("alpha", alphas), ("k", ks), ("window", windows)):
        for value in values:
            fields = ABLATIONS[axis]
            if any(gard.value(f, m) != value for f in fields for m in ablation_methods if m in METHODS):
                variants.append((axis, value))
    for method in ablation_methods if variants else ():
        if method not in SPECTRAL_METHODS:
            raise ValueError(f"ablation method {method!r} has no α / k / M; choose from {', '.join(SPECTRAL_METHODS)}")
    for axis, value in variants:
        fields = ABLATIONS[axis]
        settings = gard.replace(**{f: value for f in fields})
        for budget in ablation_budgets if ablation_budgets is not None else [max(budgets)]:
            for method in ablation_methods:
                for seed in ablation_seeds if ablation_seeds is not None else seeds:
                    name = f"{method}_b{budget}_s{seed}_{axis}{value}{tag}"
                    runs.append(GridRun(name, method, budget, seed, settings, {f: value for f in fields}, lr))
    return runs


def check_budgets(model: nn.Module, runs: Sequence[GridRun]) -> None:
    """Raise ValueError (one line) for a budget below what a method needs on this model."""
    for run in runs:
        targets = run.gard.value("target_modules", run.method)
        costs = adapted_costs(model, targets)
        need = minimum_budget(run.method, costs, run.gard)
        if run.budget < need:
            raise ValueError(
                f"budget {run.budget} is below the minimum of {run.method} on this model ({need} parameters "
                f"for target modules {targets})"
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
        key = fingerprint(run_spec(run.method, run.budget, run.seed, run.train(train), run.gard, ws.context))
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
            run.method, run.budget, run.seed, ws.model, ws.data, run.train(train), run.gard,
            out_dir=out_dir / run.name, context=ws.context, progress=progress, variant=run.variant,
        )
        test = metrics["test_ppl"]
        log(
            f"{run.name}: val PPL {metrics['primary_metric']:.4f}"
            + ("" if test is None else f", test PPL {test:.4f}")
            + f", LoRA params final {metrics['lora_params_final']}, train {metrics['train_seconds']:.1f} s"
        )
        results.append(metrics)
    return results


def run_lr_sweep(
    ws: Workspace,
    methods: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    lrs: Sequence[float],
    gard: GardSettings,
    train: TrainSettings,
    out_dir: Path,
    sweep_seed: Optional[int] = None,
    progress: bool = True,
    log=print,
    extend: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Learning-rate sweep, then every seed at the chosen rate; resumable like run_grid.

    Every method gets the same grid `lrs` at every budget on `sweep_seed` (default: the first
    of `seeds`); the rate with the lowest validation PPL (best_mean_val_ppl) is chosen per
    method and budget (ties: the smaller rate); then every other seed runs at that rate. The
    sweep seed's run at the chosen rate is reused. Test PPL plays no part in the choice.

    extend > 0: a rate chosen at an edge of what was tried is not tuned, so that method and
    budget also tries the next rate beyond the edge (the grid's outer step: lrs[-1] / lrs[-2]
    above, lrs[1] / lrs[0] below), up to `extend` rates per side, until its best is inside.
    The same rule applies to every method.

    Returns:
        (metrics of the chosen runs, every seed; sweep records: method, budget, lr, val PPL, chosen).
    """
    if not lrs:
        raise ValueError("run_lr_sweep needs at least one learning rate")
    lrs = sorted(lrs)
    if extend and len(lrs) < 2:
        raise ValueError("extending a learning-rate sweep needs at least two rates (their ratio is the step)")
    sweep_seed = seeds[0] if sweep_seed is None else sweep_seed
    sweep_runs = [run for lr in lrs for run in plan_grid(methods, budgets, [sweep_seed], gard, lr=lr)]
    swept = run_grid(ws, sweep_runs, train, out_dir, progress, log)
    for _ in range(extend):
        more = []
        for method in methods:
            for budget in budgets:
                mine = [m for m in swept if m["method"] == method and m["budget"] == budget]
                tried = sorted(m["hyperparameters"]["lr"] for m in mine)
                best = best_rate(mine)["hyperparameters"]["lr"]
                if best == tried[-1]:
                    more += plan_grid([method], [budget], [sweep_seed], gard, lr=float(f"{best * lrs[-1] / lrs[-2]:.3g}"))
                elif best == tried[0]:
                    more += plan_grid([method], [budget], [sweep_seed], gard, lr=float(f"{best * lrs[0] / lrs[1]:.3g}"))
        if not more:
            break
        log("best rate at an edge of the sweep, trying beyond it: " + ", ".join(run.name for run in more))
        swept += run_grid(ws, more, train, out_dir, progress, log)
    records, chosen = [], {}
    for method in methods:
        for budget in budgets:
            mine = [m for m in swept if m["method"] == method and m["budget"] == budget]
            best = best_rate(mine)
            chosen[(method, budget)] = best["hyperparameters"]["lr"]
            for m in sorted(mine, key=lambda m: m["hyperparameters"]["lr"]):
                records.append({
                    "method": method, "budget": budget, "lr": m["hyperparameters"]["lr"],
                    "val_ppl": m["best_mean_val_ppl"], "test_ppl": m.get("test_ppl"), "chosen": m is best,
                })
    final_runs = []
    for (method, budget), lr in chosen.items():
        final_runs += plan_grid([method], [budget], list(seeds), gard, lr=lr)
    log("chosen learning rates (validation): " + ", ".join(f"{m} b={b}: {lr:g}" for (m, b), lr in chosen.items()))
    return run_grid(ws, final_runs, train, out_dir, progress, log), records


RUN_KEYS = (
    "method", "budget", "seed", "variant", "primary_metric", "best_mean_val_ppl", "final_val_ppl", "test_ppl",
    "lora_params_mean", "lora_params_final", "total_elapsed_seconds", "train_seconds", "tokens_per_second",
    "backprop_blocks_max", "blocks_total", "final_ranks", "per_topic_val_ppl", "per_topic_test_ppl",
)


def write_results(
    out_dir: Path, runs: Sequence[dict], base: Optional[dict], settings: dict[str, Any], title: str,
    lr_sweep: Optional[Sequence[dict]] = None, references: Sequence[str] = REFERENCE_METHODS,
) -> dict:
    """results.json (every run's headline numbers + aggregates) and results.md; paired tests
    against each of `references` the runs hold."""
    summary = summarize(runs, base, references)
    if lr_sweep:
        summary["lr_sweep"] = list(lr_sweep)
    payload = {
        "settings": settings,
        "summary": summary,
        "runs": [{**{key: run.get(key) for key in RUN_KEYS}, "lr": run["hyperparameters"].get("lr")} for run in runs],
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
    "run_lr_sweep",
    "variant_label",
    "write_results",
]
