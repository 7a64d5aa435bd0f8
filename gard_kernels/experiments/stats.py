"""Aggregates over seeds: mean ± 95 % t-interval, paired tests against uniform LoRA and GoRA, and
the learning rate each method and budget reports (chosen on validation)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

PAPER_RESULT = {"method": "GARD (paper, 1 run, RTX 6000 Ada)", "ppl": 17.5529, "params": 2570.0, "runtime": 16.9397}
REFERENCE_METHOD = "uniform"
# Paired tests are against each of these that a grid holds.
REFERENCE_METHODS = ("uniform", "gora")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); half-width is nan for n < 2."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(var / n)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of a - b on matching seeds: mean, 95 % CI half-width, t-test p-value."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, half = mean_ci(diffs)
    if len(diffs) < 2:
        p = math.nan
    elif all(d == diffs[0] for d in diffs):
        p = 0.0 if diffs[0] != 0 else 1.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"n": len(diffs), "diff_mean": mean, "diff_ci": half, "p_value": p, "wins": sum(d < 0 for d in diffs)}


def best_rate(runs: Sequence[dict]) -> dict:
    """The run with the lowest validation PPL (ties: the smaller rate)."""
    return min(runs, key=lambda m: (m["best_mean_val_ppl"], m["hyperparameters"]["lr"]))


def chosen_rate_runs(runs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The runs a table reports, from the runs alone (a directory that several `gard compare`
    invocations wrote into, or a sweep copied from elsewhere).

    A method, budget and variant whose runs used one learning rate keeps them all. One that ran
    several rates was swept: the sweep seed is the seed that ran the most rates (ties: the
    smallest), the chosen rate is its run with the lowest validation PPL (`best_rate`; test PPL
    plays no part), and every seed's run at that rate is kept.

    Returns:
        (kept runs, sweep records: method, budget, variant, lr, val_ppl, test_ppl, chosen), the
        records in the order of `summarize`'s groups, then by rate.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["budget"], variant_label(run.get("variant") or {})), []).append(run)
    kept, records = [], []
    for (method, budget, variant), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        rates = {m["hyperparameters"]["lr"] for m in members}
        if len(rates) == 1:
            kept += members
            continue
        per_seed: dict[int, list[dict]] = {}
        for m in members:
            per_seed.setdefault(m["seed"], []).append(m)
        sweep_seed = min(per_seed, key=lambda s: (-len({m["hyperparameters"]["lr"] for m in per_seed[s]}), s))
        swept = per_seed[sweep_seed]
        best = best_rate(swept)
        chosen = best["hyperparameters"]["lr"]
        kept += [m for m in members if m["hyperparameters"]["lr"] == chosen]
        for m in sorted(swept, key=lambda m: m["hyperparameters"]["lr"]):
            records.append({
                "method": method, "budget": budget, "variant": variant, "lr": m["hyperparameters"]["lr"],
                "val_ppl": m["best_mean_val_ppl"], "test_ppl": m.get("test_ppl"), "chosen": m is best,
            })
    return kept, records


def variant_label(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(variant.items()))


def _metric(run: dict, name: str) -> Optional[float]:
    return run.get("test_ppl") if name == "test" else run.get("primary_metric")


def _mean(values: Sequence[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def summarize(runs: Sequence[dict], base: Optional[dict] = None, references: Sequence[str] = REFERENCE_METHODS) -> dict[str, Any]:
    """Group run metrics by (method, budget, variant) and compare each group with the references.

    The reported metric is test PPL when every run has one (validation PPL otherwise, e.g. runs
    made before the test split existed); validation PPL is always shown too. Paired tests are
    against every reference method present (default REFERENCE_METHODS: uniform LoRA and GoRA).

    Args:
        runs: metrics dicts (metrics.json contents).
        base: the base model's evaluation ({"ppl": ..., "test_ppl": ...}), a reference row.
        references: the methods every other group is paired against (in this order).
    Returns:
        {"metric": "test" | "val", "groups": [...], "paired": [...], "references": [...], "base": base,
        "paper": PAPER_RESULT}.
    """
    metric = "test" if runs and all(r.get("test_ppl") is not None for r in runs) else "val"
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["method"], run["budget"], variant_label(run.get("variant", {})))
        groups.setdefault(key, []).append(run)
    rows = [
        _group_row(method, budget, variant, sorted(members, key=lambda r: r["seed"]), metric)
        for (method, budget, variant), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0]))
    ]
    paired = []
    for reference in references:
        for row in rows:
            if row["method"] == reference and not row["variant"]:
                continue
            ref_key = (reference, row["budget"], "")
            if ref_key not in groups:
                continue
            ref = {r["seed"]: _metric(r, metric) for r in groups[ref_key]}
            mine = {r["seed"]: _metric(r, metric) for r in groups[(row["method"], row["budget"], row["variant"])]}
            seeds = sorted(set(ref) & set(mine))
            if not seeds:
                continue
            test = paired_test([mine[s] for s in seeds], [ref[s] for s in seeds])
            paired.append({"reference": reference, "method": row["method"], "budget": row["budget"], "variant": row["variant"], "seeds": seeds, **test})
    return {"metric": metric, "groups": rows, "paired": paired, "references": list(references), "base": base, "paper": PAPER_RESULT}


def _group_row(method: str, budget: int, variant: str, members: list[dict], metric: str) -> dict[str, Any]:
    """One group's aggregates (members sorted by seed)."""
    ppl_mean, ppl_ci = mean_ci([_metric(r, metric) for r in members])
    val_mean, val_ci = mean_ci([r["primary_metric"] for r in members])
    time_mean, time_ci = mean_ci([r["total_elapsed_seconds"] for r in members])
    return {
        "method": method,
        "budget": budget,
        "variant": variant,
        "n": len(members),
        "seeds": [r["seed"] for r in members],
        "lrs": sorted({r.get("hyperparameters", {}).get("lr") for r in members} - {None}),
        "ppl_mean": ppl_mean,
        "ppl_ci": ppl_ci,
        "ppl_per_seed": [_metric(r, metric) for r in members],
        "val_mean": val_mean,
        "val_ci": val_ci,
        "params_mean": sum(r["lora_params_mean"] for r in members) / len(members),
        "params_final_mean": sum(r["lora_params_final"] for r in members) / len(members),
        "runtime_mean": time_mean,
        "runtime_ci": time_ci,
        "train_seconds_mean": _mean([r.get("train_seconds") for r in members]),
        "tokens_per_second_mean": _mean([r.get("tokens_per_second") for r in members]),
        "backprop_blocks_max": max((r.get("backprop_blocks_max") or 0) for r in members),
        "blocks_total": max((r.get("blocks_total") or 0) for r in members),
    }


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_p(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3g}"


def _ci(mean: float, half: float) -> str:
    return _fmt(mean) + ("" if half is None or math.isnan(half) else f" ± {half:.4f}")


def _delta(test: Optional[dict]) -> str:
    """A paired difference as one cell; bold where its CI excludes 0."""
    if test is None:
        return ""
    cell = f"{test['diff_mean']:+.3f}"
    if not math.isnan(test["diff_ci"]):
        cell += f" ± {test['diff_ci']:.3f}"
    cell += f" (p = {_fmt_p(test['p_value'])}, {test['wins']}/{test['n']})"
    excludes_zero = not math.isnan(test["diff_ci"]) and abs(test["diff_mean"]) > test["diff_ci"]
    return f"**{cell}**" if excludes_zero else cell


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table whose header, separator and rows have the same number of columns.

    Args:
        header: column titles; align: one letter per column, "l" (left) or "r" (right).
        rows: one cell per column each.
    """
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"a table of {len(header)} columns got alignments {align!r} and rows of {sorted({len(r) for r in rows})} cells")
    separator = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", separator, *("| " + " | ".join(cells) + " |" for cells in rows)]


def glance_markdown(summary: dict) -> list[str]:
    """One row per method and budget with everything a reader compares: the reported PPL with
    its CI and per seed, validation PPL, final parameters (and the mean over steps where it
    differs by over 1 %), cost, and the paired differences
    against each reference in the same row (the table docs/results.md shows)."""
    label = "test PPL" if summary.get("metric", "val") == "test" else "val PPL"
    references = [ref for ref in summary.get("references", REFERENCE_METHODS) if any(p.get("reference", REFERENCE_METHOD) == ref for p in summary["paired"])]
    pairs = {(p.get("reference", REFERENCE_METHOD), p["method"], p["budget"], p["variant"]): p for p in summary["paired"]}
    header = ["budget", "method", "lr", f"{label} (mean ± 95 % CI)", "per seed", "val PPL", "LoRA params", "train s",
              "tokens/s", "backprop blocks", *(f"Δ vs {ref}" for ref in references)]
    rows = []
    for row in summary["groups"]:
        ci = "" if math.isnan(row["ppl_ci"]) else f" ± {row['ppl_ci']:.3f}"
        params = f"{row['params_final_mean']:,.0f}"
        if abs(row["params_mean"] - row["params_final_mean"]) > 0.01 * max(row["params_final_mean"], 1):
            params += f" (mean {row['params_mean']:,.0f})"  # e.g. AdaLoRA trains more than it keeps
        rows.append([
            f"{row['budget']:,}",
            row["method"] + (f" ({row['variant']})" if row["variant"] else ""),
            ", ".join(f"{lr:.0e}".replace("e-0", "e-") for lr in row.get("lrs", [])),
            f"{_fmt(row['ppl_mean'], 3)}{ci}",
            " / ".join(_fmt(v, 3) for v in row["ppl_per_seed"]),
            _fmt(row["val_mean"], 3),
            params,
            _fmt(row.get("train_seconds_mean", math.nan), 0),
            _fmt(row.get("tokens_per_second_mean", math.nan), 0),
            _depth(row),
            *(_delta(pairs.get((ref, row["method"], row["budget"], row["variant"]))) for ref in references),
        ])
    return markdown_table(header, "rlrllrrrrr" + "l" * len(references), rows)


def _depth(row: dict) -> str:
    return f"{row['backprop_blocks_max']}/{row['blocks_total']}" if row.get("blocks_total") else ""


def results_markdown(summary: dict, title: str = "Results") -> str:
    """The results tables as Markdown: mean ± 95 % CI over seeds of the reported PPL (test, or
    validation for older runs) beside validation PPL, real parameter counts, cost (train
    seconds, tokens/s, transformer blocks the backward pass reaches), then paired differences
    against uniform LoRA and GoRA."""
    label = "test PPL" if summary.get("metric", "val") == "test" else "val PPL"
    lines = [f"# {title}", ""]
    if summary["groups"]:
        lines += [
            f"At a glance: Δ is the paired difference of {label} on matching seeds (negative: lower than the reference), "
            "mean ± 95 % CI, two-sided paired t-test, seeds lower; bold where the CI excludes 0.",
            "",
            *glance_markdown(summary),
            "",
            "All groups, with the base model and the paper's single run:",
            "",
        ]
    lines += _groups_markdown(summary, label)
    lines += [
        "",
        "backprop blocks: how many transformer blocks the backward pass reaches at its deepest (from the earliest "
        "adapted module with rank > 0, or sketching, to the top) / blocks in the model.",
    ]
    for reference in summary.get("references", REFERENCE_METHODS):
        lines += _paired_markdown(summary, reference, label)
    sweep = summary.get("lr_sweep")
    if sweep:
        lines += [
            "",
            "Learning-rate sweep (validation PPL, sweep seed; the chosen rate in bold; test PPL plays no part):",
            "",
            *markdown_table(["method", "budget", "lr", "val PPL"], "lrrr", [
                [rec["method"], str(rec["budget"]), f"{rec['lr']:g}", f"**{_fmt(rec['val_ppl'])}**" if rec["chosen"] else _fmt(rec["val_ppl"])]
                for rec in sweep
            ]),
        ]
    return "\n".join(lines) + "\n"


def _groups_markdown(summary: dict, label: str) -> list[str]:
    """Every group, after the base model's row and the paper's single run."""
    rows = []
    base = summary.get("base")
    if base:
        shown = base.get("test_ppl") if summary.get("metric", "val") == "test" else base["ppl"]
        rows.append(["base model (no adaptation)", "0", "", "1", "", _fmt(shown), _fmt(base["ppl"]), "0", "0", "", "", "0"])
    paper = summary.get("paper")
    if paper:
        rows.append([paper["method"], f"{paper['params']:.0f}", "", "1", "", f"{paper['ppl']:.4f} (val, other data)", "", "n/a",
                     f"{paper['params']:.0f}", f"{paper['runtime']:.1f} (total)", "", ""])
    for row in summary["groups"]:
        rows.append([
            row["method"], str(row["budget"]), row["variant"], str(row["n"]), ", ".join(f"{lr:g}" for lr in row.get("lrs", [])),
            _ci(row["ppl_mean"], row["ppl_ci"]), _fmt(row["val_mean"]), f"{row['params_final_mean']:.0f}", f"{row['params_mean']:.0f}",
            _fmt(row.get("train_seconds_mean", math.nan), 1), _fmt(row.get("tokens_per_second_mean", math.nan), 0), _depth(row),
        ])
    header = ["method", "budget", "variant", "seeds", "lr", f"{label} (mean ± 95% CI)", "val PPL (mean)", "LoRA params (final)",
              "LoRA params (mean)", "train s", "tokens/s", "backprop blocks"]
    return markdown_table(header, "lrlrllrrrrrr", rows)


def _paired_markdown(summary: dict, reference: str, label: str) -> list[str]:
    """The paired differences against `reference` (nothing when no group was paired with it)."""
    pairs = [r for r in summary["paired"] if r.get("reference", REFERENCE_METHOD) == reference]
    if not pairs:
        return []
    rows = [
        [p["method"], str(p["budget"]), p["variant"], str(p["n"]),
         f"{p['diff_mean']:+.4f}" + ("" if math.isnan(p["diff_ci"]) else f" ± {p['diff_ci']:.4f}"),
         _fmt_p(p["p_value"]), f"{p['wins']}/{p['n']}"]
        for p in pairs
    ]
    header = ["method", "budget", "variant", "pairs", "ΔPPL (mean ± 95% CI)", "p-value", f"seeds better than {reference}"]
    return [
        "",
        f"Paired differences of {label} against {reference} on matching seeds (negative = lower PPL than {reference}); "
        "p from a two-sided paired t-test.",
        "",
        *markdown_table(header, "lrlrlrr", rows),
    ]
