"""`gard report`'s tables render for any set of runs: every row has its header's columns."""
import pytest

from gard_kernels.experiments import stats


def _run(method, seed, ppl, budget=2570, variant=None, test=True):
    return {
        "method": method, "budget": budget, "seed": seed, "variant": variant or {}, "primary_metric": ppl,
        "best_mean_val_ppl": ppl, "test_ppl": ppl + 0.5 if test else None, "total_elapsed_seconds": 10.0,
        "lora_params_mean": 2000.0, "lora_params_final": 2000, "hyperparameters": {"lr": 1e-2},
        "train_seconds": 8.0, "tokens_per_second": 100.0, "backprop_blocks_max": 3, "blocks_total": 4,
    }


def _tables(markdown: str) -> list[list[str]]:
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _columns(line: str) -> int:
    assert line.startswith("|") and line.endswith("|"), line
    return len(line[1:-1].split("|"))


CASES = {
    "one method, one seed": [_run("gard", 0, 20.0)],
    "one method, three seeds, no reference": [_run("gard", s, 20.0 + s) for s in range(3)],
    "only the reference": [_run("uniform", s, 21.0) for s in range(2)],
    "reference, one seed": [_run("gard", 0, 20.0), _run("uniform", 0, 21.0)],
    "both references, a variant, validation only": [
        _run("gard", 0, 20.0, test=False), _run("uniform", 0, 21.0), _run("gora", 0, 20.5),
        _run("gard", 0, 19.0, variant={"alpha": 0.5}),
    ],
    "two budgets, one seed": [_run("gard", 0, 20.0), _run("uniform", 0, 21.0, budget=100)],
}


@pytest.mark.parametrize("runs", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("base", [None, {"ppl": 30.0, "test_ppl": 31.0}])
def test_every_table_has_as_many_columns_in_every_line(runs, base):
    summary = stats.summarize(runs, base)
    markdown = stats.results_markdown(summary, "t")
    tables = _tables(markdown)
    assert len(tables) >= 2  # at a glance, all groups
    for table in tables:
        counts = {_columns(line) for line in table}
        assert len(counts) == 1, "\n".join(table)
        assert set(table[1]) <= set("|-:"), table[1]
    glance = stats.glance_markdown(summary)
    assert len(glance) == 2 + len(summary["groups"])
    assert {_columns(line) for line in glance} == {10 + len({p["reference"] for p in summary["paired"]})}


def test_a_table_refuses_rows_of_another_width():
    with pytest.raises(ValueError, match="a table of 2 columns"):
        stats.markdown_table(["a", "b"], "lr", [["1", "2", "3"]])
