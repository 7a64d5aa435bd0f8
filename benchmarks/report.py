"""Turn a pytest-benchmark JSON file into docs/benchmarks.md-style ratio tables.

Usage: python benchmarks/report.py benchmarks/results.json docs/benchmarks.md
Within each group, every "candidate" is compared with the group's "baseline" (same run).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def rate_rows(group: str, benches: list[dict], baseline: dict) -> list[str]:
    """Rows of a compute-rate group: GFLOP/s of each benchmark and its fraction of the baseline's."""
    base_rate = baseline["extra_info"]["flops"] / baseline["stats"]["median"]
    lines = [f"### {group}", "", "| benchmark | median (ms) | IQR (ms) | GFLOP/s | rate vs baseline | target |",
             "|---|---|---|---|---|---|"]
    for b in sorted(benches, key=lambda b: b["extra_info"].get("role") != "baseline"):
        stats, info = b["stats"], b["extra_info"]
        name = b["name"].split("::")[-1] + (f" [{info['backend']}]" if info.get("backend") else "")
        rate = info["flops"] / stats["median"]
        target = info.get("target_rate")
        verdict = f">= {target}: {'met' if rate / base_rate >= target else 'MISSED'}" if target is not None else ""
        relative = "baseline" if b is baseline else f"{rate / base_rate:.2f}"
        lines.append(
            f"| {name} | {stats['median'] * 1e3:.3f} | {stats['iqr'] * 1e3:.3f} | {rate / 1e9:.1f} | {relative} | {verdict} |"
        )
    lines.append("")
    return lines


def render(results: dict) -> str:
    machine = results.get("machine_info", {})
    commit = results.get("commit_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; python {machine.get('python_version', '?')}; "
        f"commit {commit.get('id', '?')[:10]}; {results.get('datetime', '')}",
        "",
    ]
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    for group, benches in sorted(groups.items()):
        baselines = [b for b in benches if b["extra_info"].get("role") == "baseline"]
        base = baselines[0]["stats"]["median"] if baselines else None
        if baselines and "flops" in baselines[0]["extra_info"]:
            lines += rate_rows(group, benches, baselines[0])
            continue
        lines += [f"### {group}", "", "| benchmark | median (ms) | IQR (ms) | speedup vs baseline | target |", "|---|---|---|---|---|"]
        for b in sorted(benches, key=lambda b: b["extra_info"].get("role") != "baseline"):
            stats, info = b["stats"], b["extra_info"]
            name = b["name"].split("::")[-1]
            if info.get("backend"):
                name += f" [{info['backend']}]"
            speedup = f"{base / stats['median']:.2f}x" if base and info.get("role") == "candidate" else "baseline"
            target = info.get("target_speedup")
            verdict = ""
            if target is not None and base:
                verdict = f">= {target}x: {'met' if base / stats['median'] >= target else 'MISSED'}"
            lines.append(
                f"| {name} | {stats['median'] * 1e3:.3f} | {stats['iqr'] * 1e3:.3f} | {speedup} | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python benchmarks/report.py RESULTS.json OUTPUT.md")
    with open(argv[1]) as f:
        results = json.load(f)
    table = render(results)
    start, end = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
    try:
        with open(argv[2]) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in doc:
        doc += f"\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(argv[2], "w") as f:
        f.write(f"{head}{start}\n{table}\n{end}{tail}")
    print(table)


if __name__ == "__main__":
    main(sys.argv)
