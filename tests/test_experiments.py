"""Experiment engine on tiny in-process models: data split, every method's run, grids, stats, plots."""
import json
import math

import pytest
import torch

from gard_kernels.experiments import compare, data, evaluation, io, module_names, plots, presets, runner, stats
from gard_kernels.experiments.baselines import gora, uniform
from gard_kernels.experiments.method import MethodRun
from gard_kernels.experiments.settings import GardSettings, TrainSettings
from gard_kernels.experiments.workspace import base_evaluation, make_workspace

from .models import VOCAB, tiny_gpt2, tiny_llama

TRAIN = TrainSettings(steps=5, batch_size=2, max_len=16, eval_blocks=12, eval_batch_size=4, test_blocks=10)
# The torch sketch backend: "auto" may JIT-build the C++ kernel, which is not what these tests are about.
GARD = GardSettings(window=2, interval=2, k_in=4, k_out=4, backend="torch")
# Tiny Llama: q_proj costs 32 + 32, v_proj 32 + 16 per layer; 2 layers -> 224 per rank unit.
BUDGET = 500

METRIC_KEYS = [
    "primary_metric", "best_mean_val_ppl", "final_val_ppl", "lora_params_mean", "lora_params_final",
    "total_elapsed_seconds", "train_seconds", "eval_seconds", "method", "budget", "seed", "hyperparameters",
    "device", "package_version", "final_ranks", "history", "per_topic_val_ppl", "val_history", "fingerprint",
    "test_ppl", "per_topic_test_ppl", "tokens_per_second", "train_tokens", "backprop_blocks_max", "blocks_total",
]
# GARDConfig's field names (no paper symbols), plus the training settings.
HYPER_KEYS = [
    "lr", "batch_size", "steps", "max_len", "budget", "target_modules", "alpha", "ema", "interval", "window",
    "k_in", "k_out", "delta_max", "r_min", "r_max", "seed", "precision", "compile", "test_blocks",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace():
    return make_workspace(tiny_llama(), data.ByteTokenizer(VOCAB), "tiny-llama", "pydoc-topics", 16, progress=False)


def test_topic_split_is_three_way_disjoint_deterministic_and_complete():
    topics = [t for t, _ in data.load_corpus("pydoc-topics")]
    train, val, test = data.split_topics(topics, 0.2, seed=0)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert set(train) | set(val) | set(test) == set(topics)
    assert len(val) == len(test) == math.ceil(0.2 * len(topics))
    assert (train, val, test) == data.split_topics(list(reversed(topics)), 0.2, seed=0)
    assert val != data.split_topics(topics, 0.2, seed=1)[1]
    # Adding the test split left the validation topics of the earlier two-way split unchanged.
    assert data.split_topics(topics, 0.2, seed=0, test_fraction=0.0)[1] == val
    assert data.split_topics(topics, 0.2, seed=0, test_fraction=0.0)[2] == []
    with pytest.raises(ValueError, match="at least 3 topics"):
        data.split_topics(["a", "b"])


def test_packed_blocks_never_mix_train_and_validation_topics(workspace):
    d = workspace.data
    assert not set(d.train_topics) & set(d.val_topics)
    assert {topic for topic, _ in d.val_blocks} <= set(d.val_topics)
    assert d.train_blocks.shape[1] == 16 and d.train_blocks.dtype == torch.long
    assert not set(d.test_topics) & (set(d.train_topics) | set(d.val_topics)) and d.test_topics
    assert {topic for topic, _ in d.test_blocks} <= set(d.test_topics)
    assert all(2 <= block.numel() <= 16 for _, block in d.val_blocks + d.test_blocks)
    subset = d.eval_subset(len(d.val_topics))
    assert [t for t, _ in subset] == sorted(d.val_topics)  # round-robin: one block per topic first
    assert [t for t, _ in d.eval_subset(len(d.test_topics), "test")] == sorted(d.test_topics)
    # No training token comes from a held-out topic: the train stream is exactly the train topics.
    encode = data.ByteTokenizer(VOCAB).encode
    docs = dict(data.load_corpus("pydoc-topics"))
    expected = sum(len(encode(docs[t])) + 1 for t in d.train_topics)
    assert d.stats["train_tokens"] == expected


def test_text_file_and_stdlib_corpora(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "word " * 300 for i in range(40)), encoding="utf-8")
    docs = data.load_corpus("ignored", str(path))
    assert len(docs) >= 2 and docs == data.load_corpus("ignored", str(path))
    built = data.build_data(docs, data.ByteTokenizer(VOCAB).encode, VOCAB - 1, 32, "text", progress=False)
    assert not set(built.train_topics) & set(built.val_topics)
    assert built.test_topics and built.test_blocks and not set(built.test_topics) & (set(built.train_topics) | set(built.val_topics))
    # A text too short for three chunks is split in thirds of its paragraphs.
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(6)), encoding="utf-8")
    thirds = data.load_corpus("ignored", str(short))
    assert len(thirds) == 3 and all(text.count("paragraph") == 2 for _, text in thirds)
    stdlib = data.load_corpus("stdlib-source")
    assert len(stdlib) >= 10 and all(text for _, text in stdlib)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("nope")


def test_uniform_ranks_fall_back_to_the_last_layers():
    costs = [1152, 768] * 30  # SmolLM2-135M q_proj, v_proj
    caps = [576, 192] * 30
    ranks, fallback = uniform.uniform_ranks(costs, caps, 57_600)
    assert ranks == [1] * 60 and not fallback
    # r_max bounds uniform LoRA like every other method (it used to be ignored).
    assert uniform.uniform_ranks(costs, caps, 20 * 57_600, r_max=8)[0] == [8] * 60
    assert uniform.uniform_ranks(costs, caps, 20 * 57_600)[0] == [20] * 60
    ranks, fallback = uniform.uniform_ranks(costs, caps, 2_570)
    assert fallback and ranks[-2:] == [1, 1] and sum(ranks) == 2
    assert sum(r * c for r, c in zip(ranks, costs)) == 1920


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside PEFT's AdaLoRA
# Every method but the diagnostics that read another run's ranks from committed files.
@pytest.mark.parametrize("method", [m for m in presets.METHODS if not presets.method_options(m).get("ranks_from")])
def test_finetune_writes_every_metric_for_every_method(workspace, method, tmp_path):
    metrics = runner.finetune(method, BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD, out_dir=tmp_path, context=workspace.context)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in saved, key
    for key in HYPER_KEYS:
        assert key in saved["hyperparameters"], key
    for key in ("primary_metric", "best_mean_val_ppl", "lora_params_mean", "total_elapsed_seconds"):
        assert math.isfinite(saved[key]), key
    assert saved["primary_metric"] == saved["best_mean_val_ppl"]
    assert len(saved["history"]) == TRAIN.steps
    assert all(math.isfinite(v) for v in saved["per_topic_val_ppl"].values())
    assert set(saved["per_topic_val_ppl"]) <= set(workspace.data.val_topics)
    assert saved["lora_params_final"] <= BUDGET
    if method == "adalora":
        # AdaLoRA starts at init_r everywhere and prunes to the budget (baselines/adalora.py).
        assert saved["method_details"]["total_rank_budget"] == BUDGET // 65
    elif presets.method_kind(method) == "adalora":
        # Held to parameters: PEFT's target rank (round(500 / 228) = 2 per module), the final count within B.
        assert saved["method_details"]["total_rank_budget"] == 2 * 4 and saved["method_details"]["parameter_budget"]
    else:
        assert saved["lora_params_mean"] <= BUDGET
    assert metrics["fingerprint"] == saved["fingerprint"]
    # The base model is never modified.
    assert not any(type(m).__name__ == "LoRALayer" for m in workspace.model.modules())


def test_static_profile_spreads_batches_over_the_window(workspace):
    """Each profiling batch gets its own ring slot (a regression: all M once summed into one slot,
    which made every spectrum rank 1 and every effective rank 1)."""
    metrics = runner.finetune("gard-static", BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD)
    event = metrics["reallocations"][0]
    assert event["profile"] and event["step"] == 0
    spectra = [sorted(eigs, reverse=True) for eigs in event["eigenvalues"] if max(eigs) > 0]
    assert spectra and all(eigs[1] > 1e-6 * eigs[0] for eigs in spectra)


def test_finetune_on_gpt2(tmp_path):
    ws = make_workspace(tiny_gpt2(), data.ByteTokenizer(VOCAB), "tiny-gpt2", "pydoc-topics", 16, progress=False)
    gard = GardSettings(target_modules=["c_attn"], window=2, interval=2, k_in=4, k_out=4, backend="torch")
    for method in ("gard-dynamic", "uniform", "gora", "eva"):
        metrics = runner.finetune(method, 300, 1, ws.model, ws.data, TRAIN, gard)
        assert math.isfinite(metrics["primary_metric"]) and metrics["lora_params_mean"] <= 300


def test_evaluate_matches_the_models_own_loss(workspace):
    blocks = [("t", workspace.data.train_blocks[i]) for i in range(3)]
    result = evaluation.evaluate(workspace.model, blocks, batch_size=2)
    ids = workspace.data.train_blocks[:3]
    with torch.no_grad():
        loss = workspace.model(input_ids=ids, labels=ids).loss
    assert result["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # Padding a short block next to a long one in the same batch changes nothing.
    short = ("t", workspace.data.train_blocks[0][:7])
    alone = evaluation.evaluate(workspace.model, [short])["ppl"]
    padded = evaluation.evaluate(workspace.model, [short, ("u", blocks[1][1])], batch_size=2)["per_topic"]["t"]
    assert padded == pytest.approx(alone, rel=1e-5)


def test_compare_resumes_and_refuses_mixed_settings(workspace, tmp_path, monkeypatch):
    runs = compare.plan_grid(["gard-dynamic", "uniform"], [BUDGET], [0, 1], GARD, alphas=[0.5], ablation_methods=["gard-dynamic"])
    assert [r.name for r in runs][-2:] == ["gard-dynamic_b500_s0_alpha0.5", "gard-dynamic_b500_s1_alpha0.5"]
    first = compare.run_grid(workspace, runs, TRAIN, tmp_path, progress=False, log=lambda *_: None)
    assert len(first) == len(runs) == 6

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "finetune", fail)
    lines = []
    second = compare.run_grid(workspace, runs, TRAIN, tmp_path, progress=False, log=lines.append)
    assert [m["fingerprint"] for m in second] == [m["fingerprint"] for m in first]
    assert "6 of 6 runs already finished" in lines[0]
    other = TrainSettings(**{**TRAIN.to_dict(), "lr": TRAIN.lr / 3})
    with pytest.raises(compare.GridMismatchError, match="other settings"):
        compare.run_grid(workspace, runs, other, tmp_path, progress=False)
    summary = compare.write_results(tmp_path, second, {"ppl": 60.0}, {}, "t")
    assert (tmp_path / "results.md").read_text().count("| gard-dynamic |") == 5  # 1 glance row, 2 result rows, 2 paired rows
    paired = [p for p in summary["paired"] if p["method"] == "gard-dynamic" and not p["variant"]][0]
    assert paired["n"] == 2 and 0.0 <= paired["p_value"] <= 1.0


def test_budget_below_a_methods_minimum_is_refused(workspace):
    runs = compare.plan_grid(["adalora"], [60], [0], GARD)
    with pytest.raises(ValueError, match="below the minimum of adalora"):
        compare.check_budgets(workspace.model, runs)
    with pytest.raises(ValueError, match="unknown method"):
        compare.plan_grid(["lora-xl"], [BUDGET], [0], GARD)


def test_mean_ci_and_paired_test_match_scipy():
    from scipy import stats as sps

    values = [17.1, 17.4, 16.9, 17.3]
    mean, half = stats.mean_ci(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=sps.tmean(values), scale=sps.sem(values))
    assert mean == pytest.approx((low + high) / 2) and half == pytest.approx((high - low) / 2)
    a, b = [1.0, 2.0, 3.5], [1.5, 2.1, 3.9]
    test = stats.paired_test(a, b)
    assert test["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert test["wins"] == 3 and test["diff_mean"] == pytest.approx(-1.0 / 3)
    assert math.isnan(stats.mean_ci([1.0])[1])


def _fake_run(method, budget, seed, lr, val, variant=None):
    return {"method": method, "budget": budget, "seed": seed, "variant": variant or {}, "best_mean_val_ppl": val,
            "test_ppl": val + 1.0, "hyperparameters": {"lr": lr}}


def test_chosen_rate_runs_keep_every_seed_at_the_rate_chosen_on_validation():
    rng = torch.Generator().manual_seed(7)
    vals = (torch.rand(4, generator=rng) * 5 + 10).tolist()
    rates = [1e-3, 3e-3, 1e-2, 3e-2]
    best = rates[min(range(4), key=lambda i: vals[i])]
    swept = [_fake_run("gora", 300, 0, lr, v) for lr, v in zip(rates, vals)]
    # Seeds 1, 2 at the chosen rate; a stray seed-1 run at another rate must not be reported.
    others = [_fake_run("gora", 300, s, best, 50.0) for s in (1, 2)]
    stray = _fake_run("gora", 300, 1, rates[0] if best != rates[0] else rates[1], 1.0)
    single = [_fake_run("uniform", 300, s, 2e-2, 12.0 + s) for s in (0, 1, 2)]
    ablated = [_fake_run("gora", 300, 0, 5e-3, 9.0, {"window": 3})]  # its own group: one rate, kept
    kept, records = stats.chosen_rate_runs(swept + others + [stray] + single + ablated)
    assert sorted((r["method"], r["seed"], r["hyperparameters"]["lr"]) for r in kept if not r["variant"]) == sorted(
        [("gora", 0, best), ("gora", 1, best), ("gora", 2, best)] + [("uniform", s, 2e-2) for s in (0, 1, 2)])
    assert ablated[0] in kept
    assert [(r["lr"], r["val_ppl"], r["chosen"]) for r in records] == [(lr, v, lr == best) for lr, v in zip(rates, vals)]
    # Ties go to the smaller rate, as in gard compare's own sweep.
    tied, tie_records = stats.chosen_rate_runs([_fake_run("eva", 1, 0, lr, 3.0) for lr in (1e-2, 1e-3)])
    assert [r["hyperparameters"]["lr"] for r in tied] == [1e-3] and [r["chosen"] for r in tie_records] == [True, False]


def test_glance_table_puts_each_groups_seeds_and_paired_differences_in_one_row():
    rng = torch.Generator().manual_seed(11)
    gard_ppl = (torch.rand(3, generator=rng) * 0.1 + 14.0).tolist()
    ppl = {
        "gard": gard_ppl,
        "uniform": [v + 2.0 + d for v, d in zip(gard_ppl, (torch.rand(3, generator=rng) * 0.1).tolist())],  # clearly above
        "gora": [v + d for v, d in zip(gard_ppl, (0.05, -0.05, 0.01))],  # the difference changes sign: CI spans 0
    }

    def run(method, seed):
        value = ppl[method][seed]
        return {"method": method, "budget": 2570, "seed": seed, "variant": {}, "test_ppl": value, "primary_metric": value - 1,
                "best_mean_val_ppl": value - 1, "hyperparameters": {"lr": 1e-2}, "total_elapsed_seconds": 9.0,
                "lora_params_mean": 2304.0, "lora_params_final": 2304, "train_seconds": 8.0, "tokens_per_second": 250.0,
                "backprop_blocks_max": 30, "blocks_total": 30}

    runs = [run(m, s) for m in ppl for s in range(3)]
    for r in runs:
        if r["method"] == "uniform":
            r["lora_params_mean"] = 20_000.0  # trained more than it kept, like AdaLoRA
    summary = stats.summarize(runs)
    lines = stats.glance_markdown(summary)
    assert lines[0].endswith("| Δ vs uniform | Δ vs gora |") and len(lines) == 2 + 3
    rows = {cells[1]: cells for cells in (line.split(" | ") for line in lines[2:])}
    assert rows["gard"][2] == "1e-2" and rows["gard"][4] == " / ".join(f"{v:.3f}" for v in gard_ppl)
    vs_uniform = stats.paired_test(gard_ppl, ppl["uniform"])
    assert rows["gard"][10] == f"**{vs_uniform['diff_mean']:+.3f} ± {vs_uniform['diff_ci']:.3f} (p = {vs_uniform['p_value']:.3g}, 3/3)**"
    vs_gora = stats.paired_test(gard_ppl, ppl["gora"])
    assert rows["gard"][11] == f"{vs_gora['diff_mean']:+.3f} ± {vs_gora['diff_ci']:.3f} (p = {vs_gora['p_value']:.3g}, 2/3) |"
    assert rows["uniform"][10] == "" and rows["uniform"][11].startswith("**+")
    assert rows["uniform"][6] == "2,304 (mean 20,000)" and rows["gard"][6] == "2,304"
    assert stats.results_markdown(summary).count("| 2,570 | ") == 3


def test_plots_are_non_empty_pngs(workspace, tmp_path):
    runs = compare.plan_grid(["gard-dynamic", "gard-static", "uniform"], [BUDGET], [0, 1], GARD, alphas=[0.5], ks=[2], windows=[3],
                             ablation_seeds=[0], ablation_methods=["gard-dynamic"])
    base = base_evaluation(workspace, TRAIN, tmp_path, progress=False)
    compare.run_grid(workspace, runs, TRAIN, tmp_path, progress=False, log=lambda *_: None)
    written, skipped = plots.plot_all(tmp_path)
    assert skipped == [
        ("fig8_rank_profiles.png", "needs runs of at least two of gard, gora, uniform"),
        ("lr_sweep.png", "no learning-rate sweep (gard compare --lrs)"),
    ]
    assert {p.name for p in written} == {
        "fig1_gradient_spectrum.png", "fig3_rank_per_layer.png", "fig4_rank_histogram.png",
        "fig5_ppl_vs_params.png", "fig6_ablation.png", "fig7_per_topic_ppl.png",
    }
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert base["ppl"] > 1.0


def test_lr_sweep_picks_the_best_validation_rate_then_runs_every_seed(workspace, tmp_path, monkeypatch):
    lrs = [1e-4, 3e-2]
    kept, sweep = compare.run_lr_sweep(workspace, ["uniform"], [BUDGET], [0, 1], lrs, GARD, TRAIN, tmp_path,
                                       progress=False, log=lambda *_: None)
    swept = {rec["lr"]: rec["val_ppl"] for rec in sweep}
    assert set(swept) == set(lrs) and sum(rec["chosen"] for rec in sweep) == 1
    best = min(swept, key=swept.get)
    assert [rec["lr"] for rec in sweep if rec["chosen"]] == [best]
    assert sorted(m["seed"] for m in kept) == [0, 1] and {m["hyperparameters"]["lr"] for m in kept} == {best}
    # The sweep seed's run at the chosen rate is reused, not run again; everything resumes.
    assert (tmp_path / f"uniform_b{BUDGET}_s0_lr{best:g}" / "metrics.json").is_file()
    monkeypatch.setattr(compare, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran again")))
    again, _ = compare.run_lr_sweep(workspace, ["uniform"], [BUDGET], [0, 1], lrs, GARD, TRAIN, tmp_path,
                                    progress=False, log=lambda *_: None)
    assert [m["fingerprint"] for m in again] == [m["fingerprint"] for m in kept]
    summary = compare.write_results(tmp_path, kept, {"ppl": 60.0, "test_ppl": 61.0}, {}, "t", sweep)
    text = (tmp_path / "results.md").read_text()
    assert "Learning-rate sweep" in text and f"**{swept[best]:.4f}**" in text and summary["metric"] == "test"
    written, _ = plots.plot_all(tmp_path)
    assert "lr_sweep.png" in {p.name for p in written}


def test_lr_sweep_extends_past_an_edge_until_the_best_is_inside(workspace, tmp_path, monkeypatch):
    # Validation PPL from a landscape with its minimum at 3e-2 (real tiny-model runs move it by
    # rounding, in either direction depending on the machine): the best of [1e-4, 3e-4] is the
    # largest, so the sweep climbs by the grid's outer ratio, twice.
    real = compare.finetune

    def landscape(*args, **kwargs):
        metrics = real(*args, **kwargs)
        lr = args[5].lr
        metrics["best_mean_val_ppl"] = metrics["primary_metric"] = 50.0 + (math.log10(lr) - math.log10(3e-2)) ** 2
        return metrics

    monkeypatch.setattr(compare, "finetune", landscape)
    lrs = [1e-4, 3e-4]
    lines = []
    kept, sweep = compare.run_lr_sweep(workspace, ["uniform"], [BUDGET], [0], lrs, GARD, TRAIN, tmp_path,
                                       progress=False, log=lines.append, extend=2)
    tried = sorted(rec["lr"] for rec in sweep)
    assert tried == pytest.approx([1e-4, 3e-4, 9e-4, 2.7e-3])
    assert any("beyond it" in line for line in lines)
    chosen = [rec["lr"] for rec in sweep if rec["chosen"]]
    assert chosen == [min(sweep, key=lambda rec: (rec["val_ppl"], rec["lr"]))["lr"]]
    assert kept[0]["hyperparameters"]["lr"] == chosen[0]
    with pytest.raises(ValueError, match="at least two rates"):
        compare.run_lr_sweep(workspace, ["uniform"], [BUDGET], [0], [1e-3], GARD, TRAIN, tmp_path, extend=1)


def test_results_report_test_ppl_cost_and_pairs_against_uniform_and_gora(workspace, tmp_path):
    runs = compare.plan_grid(["uniform", "gora", "gard"], [BUDGET], [0, 1], GARD)
    results = compare.run_grid(workspace, runs, TRAIN, tmp_path, progress=False, log=lambda *_: None)
    summary = compare.write_results(tmp_path, results, {"ppl": 60.0, "test_ppl": 61.0}, {}, "t")
    assert summary["metric"] == "test"
    by_method = {row["method"]: row for row in summary["groups"]}
    for row in by_method.values():
        mine = [m for m in results if m["method"] == row["method"]]
        assert row["ppl_mean"] == pytest.approx(sum(m["test_ppl"] for m in mine) / 2)
        assert row["tokens_per_second_mean"] > 0 and row["blocks_total"] == 2
    references = {(p["reference"], p["method"]) for p in summary["paired"]}
    assert {("uniform", "gora"), ("uniform", "gard"), ("gora", "uniform"), ("gora", "gard")} <= references
    text = (tmp_path / "results.md").read_text()
    assert "test PPL (mean ± 95% CI)" in text and "against gora" in text and "tokens/s" in text


def test_backprop_depth_counts_blocks_from_the_earliest_adapted_layer(workspace):
    # 2 layers; uniform's fallback at a budget of one q_proj unit adapts only the last layer.
    one = runner.finetune("uniform", 64, 0, workspace.model, workspace.data, TRAIN, GARD)
    assert one["final_ranks"]["model.layers.0.self_attn.q_proj"] == 0 and one["backprop_blocks_max"] == 1
    full = runner.finetune("uniform", BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD)
    assert full["backprop_blocks_max"] == 2 and full["blocks_total"] == 2
    # GARD sketches every adapted module while capturing, whatever its rank: the whole network.
    gard = runner.finetune("gard-dynamic", 64, 0, workspace.model, workspace.data, TRAIN, GARD)
    assert gard["backprop_blocks_max"] == 2
    assert module_names.block_index("model.layers.12.self_attn.q_proj") == 12 and module_names.block_index("lm_head") is None


def test_gard_method_runs_exactly_gardconfigs_defaults(monkeypatch):
    from gard_kernels.config import GARDConfig

    config = GardSettings().config("gard", 1000, seed=3)
    assert config.to_dict() == GARDConfig(budget=1000, seed=3).to_dict()
    # Changing a default of GARDConfig changes `gard` (and only the methods without a preset for it).
    monkeypatch.setattr(GARDConfig.__dataclass_fields__["window"], "default", 6)
    assert GardSettings().config("gard", 1000).window == 6
    assert GardSettings().config("gard-paper-dynamic", 1000).window == presets.EARLIER_GRID["window"]
    # Shared overrides beat presets; budget and seed are per run; unknown names are refused.
    assert GardSettings(window=3).config("gard-paper-static", 1000).window == 3
    with pytest.raises(ValueError, match="unknown GARD option"):
        GardSettings(M=2)
    with pytest.raises(ValueError, match="set per run"):
        GardSettings(budget=5)
    with pytest.raises(ValueError, match="alpha must be in"):
        GardSettings(alpha=1.5).validate(["uniform"], [1000])


def test_gora_ranks_follow_the_formula_and_respect_budget_and_bounds():
    costs, caps = [100, 60, 100, 60], [40, 20, 40, 20]
    importance = [4.0, 1.0, 0.0, 5.0]
    ranks = gora.gora_ranks(importance, costs, caps, 1000, 0, 8)
    exact = [1000 * (v / 10.0) / c for v, c in zip(importance, costs)]  # 4.0, 1.67, 0, 8.33
    assert sum(r * c for r, c in zip(ranks, costs)) <= 1000
    assert ranks[2] == 0 and ranks[3] <= 8 and all(0 <= r for r in ranks)
    assert ranks == [4, 2, 0, 8] or sum(abs(r - round(x)) for r, x in zip(ranks, exact)) <= 1
    # Rounding up everywhere overshoots: units come back from the layers furthest above their share.
    tight = gora.gora_ranks([1.0, 1.0], [10, 10], [9, 9], 25, 0, 8)
    assert tight in ([1, 1], [2, 0], [0, 2]) and sum(tight) * 10 <= 25
    assert gora.gora_ranks([1.0, 1.0], [10, 10], [9, 9], 25, 1, 8) == [1, 1]


def test_gora_init_is_one_projected_gradient_step():
    torch.manual_seed(1)
    a = torch.randn(3, 11, dtype=torch.float64)
    grad = torch.randn(7, 11, dtype=torch.float64)
    b = gora.gora_init_b(a, grad, lr=0.01, scaling=2.0)
    projector = a.T @ torch.linalg.inv(a @ a.T) @ a  # onto A's row space
    expected = -0.01 / math.sqrt(3 / 11) * grad @ projector
    assert torch.allclose(2.0 * b @ a, expected, rtol=1e-10, atol=1e-12)


def test_gora_profiles_mean_gradients_and_importance(workspace):
    gard = GARD
    metrics = runner.finetune("gora", BUDGET, 0, workspace.model, workspace.data, TRAIN, gard)
    details = metrics["method_details"]
    # Reference: the mean gradient of every target weight over the same profiling batches, in float64.
    import copy as _copy

    model = _copy.deepcopy(workspace.model).double()
    batches = data.train_batches(workspace.data, TRAIN.batch_size, TRAIN.steps, 0)[: gard.value("window")]
    names = [n for n in metrics["adapted_modules"]]
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for total, g in zip(sums, torch.autograd.grad(evaluation.lm_loss(model, batch), weights)):
            total += g
    expected = [float((w.detach() * (s / len(batches))).abs().mean()) for w, s in zip(weights, sums)]
    assert details["importance"] == pytest.approx(expected, rel=1e-3)
    assert metrics["lora_params_final"] <= BUDGET
    assert list(details["plan"].values()) == [metrics["final_ranks"][n] for n in names]


def test_eva_uses_activation_directions_within_the_budget(workspace):
    metrics = runner.finetune("eva", BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD)
    details = metrics["method_details"]
    assert metrics["lora_params_final"] <= BUDGET and metrics["lora_params_final"] > 0
    assert sum(details["eva_ranks"].values()) == sum(details["start_ranks"].values())  # PEFT keeps the rank total
    assert all(r <= 2 * s for r, s in zip(details["eva_ranks"].values(), details["start_ranks"].values()))


def test_bf16_autocast_training_keeps_gard_capture_working(workspace):
    bf16 = TrainSettings(**{**TRAIN.to_dict(), "precision": "bf16"})
    metrics = runner.finetune("gard-static", BUDGET, 0, workspace.model, workspace.data, bf16, GARD)
    event = metrics["reallocations"][0]
    assert all(math.isfinite(v) for eigs in event["eigenvalues"] for v in eigs)
    assert sum(sum(eigs) for eigs in event["eigenvalues"]) > 0
    assert math.isfinite(metrics["test_ppl"]) and metrics["hyperparameters"]["precision"] == "bf16"
    fp32 = runner.finetune("gard-static", BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD)
    # The same run in float32 allocates from the same batches: ranks agree, PPL within bf16 noise.
    assert metrics["test_ppl"] == pytest.approx(fp32["test_ppl"], rel=0.05)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainSettings(precision="fp8")


def test_compile_option_runs_the_training_forward_through_torch_compile(workspace, monkeypatch):
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(runner.torch, "compile", fake_compile)
    settings = TrainSettings(**{**TRAIN.to_dict(), "compile": True})
    metrics = runner.finetune("uniform", BUDGET, 0, workspace.model, workspace.data, settings, GARD)
    assert len(compiled) == 1 and metrics["hyperparameters"]["compile"] is True


@pytest.mark.parametrize("method", ["update-rank-static", "update-nuclear", "energy-rank-static"])
def test_new_scores_run_end_to_end(workspace, method):
    metrics = runner.finetune(method, BUDGET, 0, workspace.model, workspace.data, TRAIN, GARD)
    event = metrics["reallocations"][0]
    assert all(math.isfinite(v) and v >= 0 for v in event["statistic"]) and max(event["statistic"]) > 0
    assert metrics["lora_params_final"] <= BUDGET


def test_dequantized_gguf_flags_are_cleared():
    from gard_kernels.experiments import models as model_source

    class GgufHfQuantizer:  # stand-in with transformers' class name
        is_trainable = False

    model = tiny_llama()
    model.hf_quantizer = GgufHfQuantizer()
    model.is_quantized = True
    model.quantization_method = "gguf"
    model.config.quantization_config = {"quant_method": "gguf"}
    assert model_source.clear_dequantized_flags(model)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)  # raised "purely quantized" before
    # Another quantizer (real quantized weights) is left alone.
    other = tiny_llama()

    class BnbHfQuantizer:
        is_trainable = True

    other.hf_quantizer = BnbHfQuantizer()
    other.is_quantized = True
    assert not model_source.clear_dequantized_flags(other) and other.is_quantized


def test_gora_init_on_square_conv1d_uses_the_linear_layout():
    # GPT-2's c_proj is a square Conv1D (weight [d_in, d_out] = [32, 32]): shapes alone cannot tell
    # its gradient's layout, and B must come from the [d_out, d_in] gradient.
    from .models import batches as token_batches, tiny_gpt2

    model = tiny_gpt2()
    settings = GardSettings(target_modules=["c_proj"], r_max=4, window=2)
    lr = 0.01
    reference = _copy_model_for_grads(model)
    method = presets.build_method(MethodRun("gora", model, 2_000, settings, seed=0, steps=4, lr=lr))
    data_batches = [b["input_ids"] for b in token_batches(2, seed=9)]
    method.prepare(data_batches, evaluation.lm_loss)
    for layer in method.manager.layers:
        if layer.rank == 0 or layer.d_in != layer.d_out:
            continue
        conv = reference.get_submodule(layer.name)
        conv.weight.requires_grad_(True)
        mean = sum(torch.autograd.grad(evaluation.lm_loss(reference, b), conv.weight)[0] for b in data_batches) / 2
        g = mean.T.double()  # Conv1D grad [d_in, d_out] -> [d_out, d_in]
        a = layer.lora_A.detach().double()
        projector = a.T @ torch.linalg.inv(a @ a.T) @ a
        expected = -lr / math.sqrt(layer.rank / layer.d_in) * g @ projector
        assert torch.allclose(layer.delta_weight().double(), expected, rtol=1e-4, atol=1e-7)
        return
    raise AssertionError("no square Conv1D got rank")


def _copy_model_for_grads(model):
    import copy as _copy

    twin = _copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin


def test_gora_ranks_under_a_budget_where_every_share_rounds_to_zero():
    # 10 layers of cost 100 and budget 250: every B s / c = 0.25 rounds to 0; the two most
    # important layers get rank 1 instead of an adapter-free run.
    importance = [0.1, 0.5, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    ranks = gora.gora_ranks(importance, [100] * 10, [8] * 10, 250, 0, 8)
    assert ranks == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    # Where the formula grants something, it stands (no top-up).
    assert gora.gora_ranks([1.0, 0.0], [100, 100], [8, 8], 250, 0, 8) == [2, 0]


def test_committed_study_runs_still_resolve_to_the_settings_they_ran():
    """A preset or default change must not silently re-mean a method name: every committed run of
    the study resolves, today, to the GARD options recorded in its metrics (what its fingerprint
    covers), except `gard` runs made before the recommended defaults (kept under another folder)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "docs" / "metrics" / "study-select"
    files = sorted(root.glob("*/metrics.json"))
    assert len(files) >= 40
    for path in files:
        run = json.loads(path.read_text(encoding="utf-8"))
        options = io.options_read_by(run["method"], GardSettings())
        recorded = run["hyperparameters"]
        assert {k: recorded.get(k) for k in options} == options, path.parent.name
