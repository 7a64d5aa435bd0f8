"""Aggregates over seeds: mean ± 95 % t-interval, and paired tests against uniform LoRA."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

PAPER_RESULT = {"method": "GARD (paper, 1 run, RTX 6000 Ada)", "ppl": 17.5529, "params": 2570.0, "runtime": 16.9397}
REFERENCE_METHOD = "uniform"


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


def variant_label(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(variant.items()))


def summarize(runs: Sequence[dict], base: Optional[dict] = None) -> dict[str, Any]:
    """Group run metrics by (method, budget, variant) and compare each group with uniform LoRA.

    Args:
        runs: metrics dicts (metrics.json contents).
        base: the base model's evaluation ({"ppl": ...}), shown as a reference row.
    Returns:
        {"groups": [...], "paired": [...], "base": base, "paper": PAPER_RESULT}.
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["method"], run["budget"], variant_label(run.get("variant", {})))
        groups.setdefault(key, []).append(run)
    rows = []
    for (method, budget, variant), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        members = sorted(members, key=lambda r: r["seed"])
        ppl_mean, ppl_ci = mean_ci([r["primary_metric"] for r in members])
        time_mean, time_ci = mean_ci([r["total_elapsed_seconds"] for r in members])
        rows.append(
            {
                "method": method,
                "budget": budget,
                "variant": variant,
                "n": len(members),
                "seeds": [r["seed"] for r in members],
                "ppl_mean": ppl_mean,
                "ppl_ci": ppl_ci,
                "ppl_per_seed": [r["primary_metric"] for r in members],
                "params_mean": sum(r["lora_params_mean"] for r in members) / len(members),
                "params_final_mean": sum(r["lora_params_final"] for r in members) / len(members),
                "runtime_mean": time_mean,
                "runtime_ci": time_ci,
            }
        )
    paired = []
    for row in rows:
        if row["method"] == REFERENCE_METHOD and not row["variant"]:
            continue
        ref_key = (REFERENCE_METHOD, row["budget"], "")
        if ref_key not in groups:
            continue
        ref = {r["seed"]: r["primary_metric"] for r in groups[ref_key]}
        mine = {r["seed"]: r["primary_metric"] for r in groups[(row["method"], row["budget"], row["variant"])]}
        seeds = sorted(set(ref) & set(mine))
        if not seeds:
            continue
        test = paired_test([mine[s] for s in seeds], [ref[s] for s in seeds])
        paired.append({"method": row["method"], "budget": row["budget"], "variant": row["variant"], "seeds": seeds, **test})
    return {"groups": rows, "paired": paired, "base": base, "paper": PAPER_RESULT}


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_p(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3g}"


def results_markdown(summary: dict, title: str = "Results") -> str:
    """The results tables as Markdown (mean ± 95 % CI over seeds, paired differences vs uniform)."""
    lines = [f"# {title}", ""]
    base = summary.get("base")
    lines += [
        "| method | budget | variant | seeds | val PPL (mean ± 95% CI) | LoRA params (mean) | LoRA params (final) | runtime s (mean) |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    if base:
        lines.append(f"| base model (no adaptation) | 0 |  | 1 | {_fmt(base['ppl'])} | 0 | 0 | {_fmt(base.get('seconds', math.nan), 1)} |")
    paper = summary.get("paper")
    if paper:
        lines.append(
            f"| {paper['method']} | {paper['params']:.0f} |  | 1 | {paper['ppl']:.4f} (other data) | {paper['params']:.1f} | n/a | {paper['runtime']:.1f} |"
        )
    for row in summary["groups"]:
        ci = "" if math.isnan(row["ppl_ci"]) else f" ± {row['ppl_ci']:.4f}"
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['variant']} | {row['n']} | {row['ppl_mean']:.4f}{ci} | "
            f"{row['params_mean']:.1f} | {row['params_final_mean']:.1f} | {row['runtime_mean']:.1f} |"
        )
    if summary["paired"]:
        lines += [
            "",
            f"Paired differences against {REFERENCE_METHOD} LoRA on matching seeds (negative = lower PPL than uniform); "
            "p from a two-sided paired t-test.",
            "",
            "| method | budget | variant | pairs | ΔPPL (mean ± 95% CI) | p-value | seeds better than uniform |",
            "|---|---:|---|---:|---|---:|---:|",
        ]
        for row in summary["paired"]:
            ci = "" if math.isnan(row["diff_ci"]) else f" ± {row['diff_ci']:.4f}"
            lines.append(
                f"| {row['method']} | {row['budget']} | {row['variant']} | {row['n']} | {row['diff_mean']:+.4f}{ci} | "
                f"{_fmt_p(row['p_value'])} | {row['wins']}/{row['n']} |"
            )
    return "\n".join(lines) + "\n"
