"""The paper's figures, drawn only from logged data (metrics.json files and base.json).

Each figure is drawn by a function named after what it plots (_plot_gradient_spectrum, ...);
the files keep the paper's figure numbers.

fig1 gradient spectral energy per layer over re-allocations (heatmap) and the spectral
statistic against the allocated rank (scatter); fig3 allocated rank per layer; fig4 histogram
of ranks; fig5 validation PPL against LoRA parameters for every method; fig6 ablation of α, k
and M; fig7 per-topic validation PPL (the paper's fig2 is a diagram, not data); fig8 where
`gard`, GoRA and uniform LoRA put rank, block by block, at every budget; lr_sweep validation PPL
against learning rate.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .io import load_base, load_runs
from .module_names import block_index, short_name
from .presets import method_order
from .stats import PAPER_RESULT, chosen_rate_runs, mean_ci, variant_label


def _representative(runs: list[dict]) -> Optional[dict]:
    """The GARD run the layer-level figures show: the first method in registry order, default settings,
    largest budget, lowest seed; otherwise any run with re-allocations."""
    candidates = [r for r in runs if r.get("reallocations") and not r.get("variant")]
    if not candidates:
        candidates = [r for r in runs if r.get("reallocations")]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (method_order(r["method"]), -r["budget"], r["seed"], variant_label(r.get("variant", {}))))


def _reported(run: dict, runs: list[dict]) -> float:
    """Test PPL when every run of the grid has one, else validation PPL (older runs)."""
    return run["test_ppl"] if all(r.get("test_ppl") is not None for r in runs) else run["primary_metric"]


def plot_all(run_dir: Path, out_dir: Optional[Path] = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write every figure the data in run_dir supports.

    Returns:
        (written PNG paths, [(figure, why it was skipped)]).
    """
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "figures"
    # A learning-rate sweep leaves runs at rates that were not chosen: plot the chosen ones.
    runs, sweep = chosen_rate_runs(load_runs(run_dir))
    base = load_base(run_dir)
    if base is None:
        known = [r["base_val_ppl"] for r in runs if r.get("base_val_ppl") is not None]
        base = {"ppl": known[0], "per_topic": {}} if known else None
    written: list[Path] = []
    skipped: list[tuple[str, str]] = []
    if not runs:
        return written, [("all", "no metrics.json found")]
    out_dir.mkdir(parents=True, exist_ok=True)
    # Layer-level figures once per budget (one file each when a grid has several budgets).
    budgets = sorted({r["budget"] for r in runs})
    figures = []
    for budget in budgets:
        pool = [r for r in runs if r["budget"] == budget]
        rep = _representative(pool)
        tag = f"_b{budget}" if len(budgets) > 1 else ""
        figures += [
            (f"fig1_gradient_spectrum{tag}.png", lambda p, rep=rep: _plot_gradient_spectrum(rep, p) if rep else "no GARD run with re-allocations"),
            (f"fig3_rank_per_layer{tag}.png", lambda p, rep=rep, pool=pool: _plot_rank_per_layer(pool, rep, p)),
            (f"fig4_rank_histogram{tag}.png", lambda p, rep=rep, pool=pool: _plot_rank_histogram(pool, rep, p) if rep else "no GARD run"),
        ]
    figures += [
        ("fig5_ppl_vs_params.png", lambda p: _plot_ppl_vs_params(runs, base, p)),
        ("fig6_ablation.png", lambda p: _plot_ablation(runs, p)),
        ("fig7_per_topic_ppl.png", lambda p: _plot_per_topic_ppl(runs, base, p)),
        ("fig8_rank_profiles.png", lambda p: _plot_rank_profiles(runs, p)),
        ("lr_sweep.png", lambda p: _plot_lr_sweep(sweep, p) if sweep else "no learning-rate sweep (gard compare --lrs)"),
    ]
    import matplotlib.pyplot as plt

    for name, draw in figures:
        path = out_dir / name
        why = draw(path)
        plt.close("all")
        if why:
            skipped.append((name, why))
        else:
            written.append(path)
    return written, skipped


def _plot_gradient_spectrum(run: dict, path: Path) -> Optional[str]:
    import matplotlib.pyplot as plt
    import numpy as np

    events = run["reallocations"]
    names = run["adapted_modules"]
    # Spectral energy of a layer at a re-allocation: the trace of its window's Gram matrix,
    # i.e. the summed squared norms of its gradient sketches over the window.
    energy = np.array([[sum(eigs) for eigs in e["eigenvalues"]] for e in events]).T  # [L, events]
    steps = [e["step"] for e in events]
    fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(12, max(4, 0.12 * len(names) + 2)), gridspec_kw={"width_ratios": [3, 2]})
    image = ax_h.imshow(np.log10(np.maximum(energy, 1e-30)), aspect="auto", cmap="magma", interpolation="nearest")
    ax_h.set_xticks(range(len(steps)), [str(s) for s in steps])
    stride = max(1, len(names) // 30)
    ax_h.set_yticks(range(0, len(names), stride), [short_name(n) for n in names[::stride]], fontsize=6)
    ax_h.set_xlabel("re-allocation at step" + (" (static profile = 0)" if any(e.get("profile") for e in events) else ""))
    ax_h.set_ylabel("adapted module")
    ax_h.set_title("gradient spectral energy log10 tr(C_l)")
    fig.colorbar(image, ax=ax_h)
    last = events[-1]
    stat = last["statistic"]
    ranks = last["ranks"]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    for kind, marker in zip(kinds, "osD^v<>"):
        idx = [i for i, n in enumerate(names) if n.endswith("." + kind) or n == kind]
        jitter = np.linspace(-0.15, 0.15, len(idx)) if len(idx) > 1 else [0.0]
        ax_s.scatter([stat[i] for i in idx], [ranks[i] + j for i, j in zip(idx, jitter)], marker=marker, label=kind, alpha=0.7)
    ax_s.set_xlabel("spectral statistic (smoothed effective rank)" if "spectral" in json.dumps(run.get("method_details", {})) else "layer statistic")
    ax_s.set_ylabel("allocated rank")
    ax_s.set_title(f"step {last['step']}: statistic vs rank")
    ax_s.legend(fontsize=8)
    fig.suptitle(f"{run['method']}, budget {run['budget']}, seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_rank_per_layer(runs: list[dict], rep: Optional[dict], path: Path) -> Optional[str]:
    import matplotlib.pyplot as plt

    anchor = rep or max(runs, key=lambda r: r["budget"])
    same = [r for r in runs if r["budget"] == anchor["budget"] and r["seed"] == anchor["seed"] and not r.get("variant")]
    same = sorted({r["method"]: r for r in same}.values(), key=lambda r: method_order(r["method"]))
    if not same:
        return "no runs"
    names = anchor["adapted_modules"]
    fig, axes = plt.subplots(len(same), 1, figsize=(max(8, 0.18 * len(names)), 1.6 * len(same) + 1), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], same):
        ranks = [run["final_ranks"].get(n, 0) for n in names]
        colors = ["tab:blue" if n.endswith("q_proj") else "tab:orange" if n.endswith("v_proj") else "tab:gray" for n in names]
        ax.bar(range(len(names)), ranks, color=colors)
        ax.set_ylabel(run["method"], rotation=0, ha="right", fontsize=8)
        ax.set_ylim(0, max(1, max(ranks)) + 0.5)
    stride = max(1, len(names) // 40)
    axes[-1, 0].set_xticks(range(0, len(names), stride), [short_name(n) for n in names[::stride]], rotation=90, fontsize=6)
    fig.suptitle(f"final rank per adapted module, budget {anchor['budget']}, seed {anchor['seed']} (blue q_proj, orange v_proj)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_rank_histogram(runs: list[dict], rep: dict, path: Path) -> Optional[str]:
    import matplotlib.pyplot as plt

    pool = [r for r in runs if r["method"] == rep["method"] and r["budget"] == rep["budget"] and not r.get("variant")]
    ranks = [v for r in pool for v in r["final_ranks"].values()]
    top = max(ranks) if ranks else 0
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(ranks, bins=[b - 0.5 for b in range(top + 2)], edgecolor="black")
    ax.set_xlabel("allocated rank")
    ax.set_ylabel("adapted modules (all seeds)")
    ax.set_title(f"{rep['method']}, budget {rep['budget']}: {len(pool)} run(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_ppl_vs_params(runs: list[dict], base: Optional[dict], path: Path) -> Optional[str]:
    import matplotlib
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if not r.get("variant"):
            groups.setdefault((r["method"], r["budget"]), []).append(r)
    split = "test" if all(r.get("test_ppl") is not None for r in runs) else "validation"
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = sorted({m for m, _ in groups}, key=method_order)
    for i, method in enumerate(methods):
        xs, ys, es = [], [], []
        for (m, budget), members in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if m != method:
                continue
            mean, half = mean_ci([_reported(r, runs) for r in members])
            xs.append(sum(r["lora_params_mean"] for r in members) / len(members))
            ys.append(mean)
            es.append(0.0 if math.isnan(half) else half)
        ax.errorbar(xs, ys, yerr=es, marker="os^Dv<>p"[i % 8], capsize=3, label=method, linestyle="-", alpha=0.85)
    base_ppl = None if not base else (base.get("test_ppl") if split == "test" else base["ppl"])
    if base_ppl is not None:
        ax.axhline(base_ppl, color="gray", linestyle="--", label=f"base model {base_ppl:.3f}")
    low, high = ax.get_ylim()
    paper = f"paper GARD {PAPER_RESULT['ppl']} at {PAPER_RESULT['params']:.0f} params (other data / length)"
    if low <= PAPER_RESULT["ppl"] <= high:
        ax.scatter([PAPER_RESULT["params"]], [PAPER_RESULT["ppl"]], marker="*", s=160, color="black", label=paper)
    else:
        # Far off this scale: a marker would flatten every curve, so it is only named.
        ax.text(0.01, 0.01, paper + ", off scale", transform=ax.transAxes, fontsize=7, color="dimgray")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("LoRA parameters (mean over training)")
    ax.set_ylabel(f"{split} PPL (mean ± 95% CI over seeds)")
    ax.set_title(f"{split} perplexity vs adapter size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_ablation(runs: list[dict], path: Path) -> Optional[str]:
    import matplotlib.pyplot as plt

    variants = [r for r in runs if r.get("variant")]
    if not variants:
        return "no ablation runs (gard compare --alphas/--ks/--windows)"
    method = variants[0]["method"]
    budgets = sorted({r["budget"] for r in variants if r["method"] == method})
    axes_spec = [("alpha", "α (energy threshold)"), ("k_in", "k (sketch size per side)"), ("window", "M (window)")]
    fig, axes = plt.subplots(len(budgets), 3, figsize=(13, 3.6 * len(budgets) + 0.6), squeeze=False)
    seeds_used = set()
    for row, budget in zip(axes, budgets):
        # Default-setting runs only of the seeds the variants used, so every point is paired by seed.
        variant_seeds = {r["seed"] for r in variants if r["method"] == method and r["budget"] == budget}
        seeds_used |= variant_seeds
        pool = [r for r in runs if r["method"] == method and r["budget"] == budget and r["seed"] in variant_seeds]
        reference = [
            r["primary_metric"] for r in runs
            if r["method"] == "uniform" and r["budget"] == budget and r["seed"] in variant_seeds and not r.get("variant")
        ]
        for ax, (field, label) in zip(row, axes_spec):
            if reference:
                ax.axhline(sum(reference) / len(reference), color="gray", linestyle="--", label="uniform LoRA")
            points: dict[float, list[float]] = {}
            for r in pool:
                v = r.get("variant", {})
                if v and field not in v:
                    continue
                value = v[field] if v else r["hyperparameters"][field]
                points.setdefault(value, []).append(r["primary_metric"])
            if len(points) < 2:
                ax.set_title(f"{label}: not varied")
                continue
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats], marker="o", capsize=3)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_xlabel(label)
            ax.set_ylabel(f"val PPL, budget {budget}")
            ax.ticklabel_format(axis="y", useOffset=False)
            if reference:
                ax.legend(fontsize=7)
    fig.suptitle(f"ablation of {method}: one factor at a time, other settings at their defaults (seeds {sorted(seeds_used)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_per_topic_ppl(runs: list[dict], base: Optional[dict], path: Path) -> Optional[str]:
    import matplotlib.pyplot as plt
    import numpy as np

    plain = [r for r in runs if not r.get("variant") and r.get("per_topic_val_ppl")]
    if not plain:
        return "no per-topic validation data"
    budgets = sorted({r["budget"] for r in plain})
    topics = sorted({t for r in plain for t in r["per_topic_val_ppl"]})
    base_topic = (base or {}).get("per_topic") or {}
    relative = bool(base_topic)
    fig, axes = plt.subplots(len(budgets), 1, figsize=(max(8, 0.5 * len(topics) + 3), 3.6 * len(budgets) + 1), squeeze=False)
    for ax, budget in zip(axes[:, 0], budgets):
        pool = [r for r in plain if r["budget"] == budget]
        methods = sorted({r["method"] for r in pool}, key=method_order)
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            members = [r for r in pool if r["method"] == method]
            values = []
            for t in topics:
                ppls = [r["per_topic_val_ppl"][t] for r in members if t in r["per_topic_val_ppl"]]
                mean = sum(ppls) / len(ppls) if ppls else float("nan")
                values.append(100.0 * (mean / base_topic[t] - 1.0) if relative and t in base_topic else mean)
            ax.bar(np.arange(len(topics)) + i * width - 0.4 + width / 2, values, width, label=method)
        ax.set_xticks(range(len(topics)), topics, rotation=60, ha="right", fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylabel("val PPL vs base model, %" if relative else "validation PPL")
        ax.set_title(f"budget {budget}", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
    fig.suptitle("per-topic validation perplexity (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


PROFILE_METHODS = ("gard", "gora", "uniform")


def _plot_rank_profiles(runs: list[dict], path: Path) -> Optional[str]:
    """Rank per transformer block and projection of PROFILE_METHODS, one panel per budget, for
    the lowest seed of each (other seeds can choose other modules: their metrics' final_ranks)."""
    import matplotlib.pyplot as plt

    pool = [r for r in runs if r["method"] in PROFILE_METHODS and not r.get("variant")]
    if len({r["method"] for r in pool}) < 2:
        return f"needs runs of at least two of {', '.join(PROFILE_METHODS)}"
    budgets = sorted({r["budget"] for r in pool})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.0), squeeze=False, sharey=True)
    styles = {"gard": ("tab:red", "o"), "gora": ("tab:blue", "s"), "uniform": ("tab:gray", "^")}
    for ax, budget in zip(axes[0], budgets):
        for method in PROFILE_METHODS:
            mine = [r for r in pool if r["method"] == method and r["budget"] == budget]
            if not mine:
                continue
            run = min(mine, key=lambda r: r["seed"])
            color, marker = styles[method]
            for proj, line in (("q_proj", "-"), ("v_proj", "--")):
                items = sorted((block_index(n), rank) for n, rank in run["final_ranks"].items() if n.endswith(proj) and block_index(n) is not None)
                if items:
                    ax.plot([b for b, _ in items], [rank for _, rank in items], line, color=color, marker=marker,
                            markersize=3, label=f"{method} {proj} ({run['lora_params_final']} params)")
        ax.set_xlabel("transformer block")
        ax.set_title(f"budget {budget}")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("final rank (lowest seed)")
    fig.suptitle("where each method puts rank (solid q_proj, dashed v_proj)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def _plot_lr_sweep(sweep: list[dict], path: Path) -> Optional[str]:
    """Validation PPL against learning rate, one line per method, one panel per budget."""
    import matplotlib.pyplot as plt

    budgets = sorted({rec["budget"] for rec in sweep})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        pool = [rec for rec in sweep if rec["budget"] == budget]
        for i, method in enumerate(sorted({rec["method"] for rec in pool}, key=method_order)):
            mine = sorted((rec for rec in pool if rec["method"] == method), key=lambda rec: rec["lr"])
            line = ax.plot([rec["lr"] for rec in mine], [rec["val_ppl"] for rec in mine], marker="os^Dv<>p"[i % 8], label=method)
            chosen = [rec for rec in mine if rec["chosen"]]
            ax.scatter([rec["lr"] for rec in chosen], [rec["val_ppl"] for rec in chosen], s=120, facecolors="none",
                       edgecolors=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (circled: chosen on validation)")
        ax.set_ylabel("validation PPL (sweep seed)")
        ax.set_title(f"budget {budget}")
        ax.legend(fontsize=7)
    fig.suptitle("learning-rate sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


__all__ = ["plot_all"]
