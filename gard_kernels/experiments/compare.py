"""Grids of runs over methods × budgets × seeds (and GARD ablation variants), resumable; a whole
comparison (`gard compare`, `gard demo`) from plan to results.md.

Each run writes OUT/<method>_b<budget>_s<seed>[_<variant>]/metrics.json; a run whose
metrics.json exists with the same fingerprint is skipped, one with another fingerprint stops the
grid (mixing settings in one table would be wrong). What the runs share is a workspace.Workspace.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from ..budget import adapter_costs
from .io import fingerprint, read_json, run_spec, write_json
from .presets import SPECTRAL_METHODS, is_method, method_kind, minimum_budget
from .runner import finetune
from .settings import GardSettings, TrainSettings
from .stats import REFERENCE_METHODS, best_rate, results_markdown, summarize
from .workspace import Workspace, base_evaluation


class GridMismatchError(ValueError):
    """An output directory holds a finished run made with other settings."""


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
        method_kind(method)
    tag = "" if lr is None else f"_lr{lr:g}"
    runs = [
        GridRun(f"{method}_b{budget}_s{seed}{tag}", method, budget, seed, gard, {}, lr)
        for budget in budgets for method in methods for seed in seeds
    ]
    variants = _ablation_variants(gard, alphas, ks, windows, ablation_methods)
    for axis, value in variants:
        fields = ABLATIONS[axis]
        settings = gard.replace(**{f: value for f in fields})
        for budget in ablation_budgets if ablation_budgets is not None else [max(budgets)]:
            for method in ablation_methods:
                for seed in ablation_seeds if ablation_seeds is not None else seeds:
                    name = f"{method}_b{budget}_s{seed}_{axis}{value}{tag}"
                    runs.append(GridRun(name, method, budget, seed, settings, {f: value for f in fields}, lr))
    return runs


def _ablation_variants(gard: GardSettings, alphas, ks, windows, ablation_methods: Sequence[str]) -> list[tuple[str, Any]]:
    """(axis, value) of every variant that differs from the ablated methods' own settings."""
    known = [m for m in ablation_methods if is_method(m)]
    variants = []
    for axis, values in (("alpha", alphas), ("k", ks), ("window", windows)):
        for value in values:
            if any(gard.value(f, m) != value for f in ABLATIONS[axis] for m in known):
                variants.append((axis, value))
    for method in ablation_methods if variants else ():
        if method not in SPECTRAL_METHODS:
            raise ValueError(f"ablation method {method!r} has no α / k / M; choose from {', '.join(SPECTRAL_METHODS)}")
    return variants


def check_budgets(model: nn.Module, runs: Sequence[GridRun]) -> None:
    """Raise ValueError (one line) for a budget below what a method needs on this model."""
    for run in runs:
        targets = run.gard.value("target_modules", run.method)
        costs = adapter_costs(model, targets)
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
        done = _finished(ws, run, train, out_dir / run.name / "metrics.json")
        if done is None:
            todo.append(run)
        else:
            results.append(done)
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


def _finished(ws: Workspace, run: GridRun, train: TrainSettings, path: Path) -> Optional[dict]:
    """The metrics of `run` when `path` holds it finished with the same settings (None: not run yet).

    Raises:
        GridMismatchError: `path` holds a run made with other settings.
    """
    if not path.is_file():
        return None
    key = fingerprint(run_spec(run.method, run.budget, run.seed, run.train(train), run.gard, ws.context))
    done = read_json(path)
    if done.get("fingerprint") != key:
        raise GridMismatchError(f"{path} was made with other settings; use another --out directory (or delete that run)")
    return done


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
        more = _beyond_the_edges(swept, methods, budgets, lrs, sweep_seed, gard)
        if not more:
            break
        log("best rate at an edge of the sweep, trying beyond it: " + ", ".join(run.name for run in more))
        swept += run_grid(ws, more, train, out_dir, progress, log)
    chosen, records = _choose_rates(swept, methods, budgets)
    final_runs = []
    for (method, budget), lr in chosen.items():
        final_runs += plan_grid([method], [budget], list(seeds), gard, lr=lr)
    log("chosen learning rates (validation): " + ", ".join(f"{m} b={b}: {lr:g}" for (m, b), lr in chosen.items()))
    return run_grid(ws, final_runs, train, out_dir, progress, log), records


def _beyond_the_edges(swept, methods, budgets, lrs, sweep_seed, gard) -> list[GridRun]:
    """For each method and budget whose best rate is the highest (lowest) it tried, a run one
    outer step above (below) it."""
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
    return more


def _choose_rates(swept, methods, budgets) -> tuple[dict[tuple[str, int], float], list[dict]]:
    """(method, budget) -> the rate chosen on validation, and one record per swept run."""
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
    return chosen, records


@dataclass(frozen=True)
class Comparison:
    """A whole comparison: its grid, an optional learning-rate sweep, and ablation variants.

    Args:
        lrs: a learning-rate sweep (run_lr_sweep); empty: every run at TrainSettings.lr.
        method_lrs: method -> the rate its runs use (the demo); no ablation with it.
        ablation: plan_grid's ablation_seeds / ablation_methods / ablation_budgets.
        lr_sweep_seed, lr_extend: run_lr_sweep's sweep_seed and extend.
    """

    methods: Sequence[str]
    budgets: Sequence[int]
    seeds: Sequence[int]
    alphas: Sequence[float] = ()
    ks: Sequence[int] = ()
    windows: Sequence[int] = ()
    ablation: dict = field(default_factory=dict)
    lrs: Sequence[float] = ()
    method_lrs: Optional[dict] = None
    lr_sweep_seed: Optional[int] = None
    lr_extend: int = 0

    def all_methods(self) -> list[str]:
        """The methods whose options must validate: the grid's and the ablated ones."""
        return list(self.methods) + list(self.ablation.get("ablation_methods") or [])

    def runs(self, gard: GardSettings) -> list[GridRun]:
        """The grid's runs (without the sweep's extra rates, which depend on results)."""
        if self.method_lrs:
            return [run for method in self.methods for run in plan_grid([method], self.budgets, self.seeds, gard, lr=self.method_lrs[method])]
        return plan_grid(self.methods, self.budgets, self.seeds, gard, self.alphas, self.ks, self.windows, **self.ablation)

    def to_dict(self) -> dict:
        """What results.json records of the plan."""
        return {
            "methods": list(self.methods), "budgets": list(self.budgets), "seeds": list(self.seeds), "lrs": list(self.lrs),
            "method_lrs": dict(self.method_lrs or {}), "alphas": list(self.alphas), "ks": list(self.ks), "windows": list(self.windows),
        }


def run_comparison(
    ws: Workspace, plan: Comparison, gard: GardSettings, train: TrainSettings, out: Path, title: str,
    record: Optional[dict] = None, progress: bool = True, log=print,
) -> dict:
    """Evaluate the base model, run (or resume) every run of `plan`, write results.md / results.json.

    Args:
        record: extra facts for results.json's settings (e.g. the command line); a "started"
            entry (time.perf_counter() before the workspace was built) becomes wall_seconds.
    Returns:
        The summary of stats.summarize.
    """
    runs = plan.runs(gard)
    check_budgets(ws.model, runs)
    out.mkdir(parents=True, exist_ok=True)
    base = base_evaluation(ws, train, out, progress)
    test = "" if base.get("test_ppl") is None else f", test PPL {base['test_ppl']:.4f} on {base['test_tokens']} tokens"
    log(f"base model (no adaptation): val PPL {base['ppl']:.4f} on {base['tokens']} tokens{test}")
    sweep = None
    if plan.lrs:
        results, sweep = run_lr_sweep(
            ws, plan.methods, plan.budgets, plan.seeds, plan.lrs, gard, train, out, plan.lr_sweep_seed, progress,
            log, extend=plan.lr_extend,
        )
        # Ablation variants at the grid's --lr (they vary GARD's knobs, not the rate).
        variants = [r for r in runs if r.variant]
        if variants:
            results += run_grid(ws, variants, train, out, progress, log)
    else:
        results = run_grid(ws, runs, train, out, progress, log)
    extra = dict(record or {})
    started = extra.pop("started", None)
    settings = {
        "train": train.to_dict(), "gard": gard.to_dict(), **plan.to_dict(),
        **{key: ws.context[key] for key in ("model", "corpus", "device", "data")},
        **extra,
    }
    if started is not None:
        settings["wall_seconds"] = time.perf_counter() - started
    return write_results(out, results, base, settings, title, sweep)


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
    "Comparison",
    "GridMismatchError",
    "GridRun",
    "check_budgets",
    "plan_grid",
    "run_comparison",
    "run_grid",
    "run_lr_sweep",
    "write_results",
]
