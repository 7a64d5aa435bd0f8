"""Experiment engine on tiny in-process models: data split, every method's run, grids, stats, plots."""
import json
import math

import pytest
import torch

from gard_kernels.experiments import compare, data, methods, plots, runner, stats

from .models import VOCAB, tiny_gpt2, tiny_llama

TRAIN = runner.TrainSettings(steps=5, batch_size=2, max_len=16, eval_blocks=12, eval_batch_size=4)
# The torch sketch backend: "auto" may JIT-build the C++ kernel, which is not what these tests are about.
GARD = methods.GardSettings(M=2, tau=2, k=4, backend="torch")
# Tiny Llama: q_proj costs 32 + 32, v_proj 32 + 16 per layer; 2 layers -> 224 per rank unit.
BUDGET = 500

METRIC_KEYS = [
    "primary_metric", "best_mean_val_ppl", "final_val_ppl", "lora_params_mean", "lora_params_final",
    "total_elapsed_seconds", "train_seconds", "eval_seconds", "method", "budget", "seed", "hyperparameters",
    "device", "package_version", "final_ranks", "history", "per_topic_val_ppl", "val_history", "fingerprint",
]
HYPER_KEYS = [
    "lr", "batch_size", "steps", "max_len", "budget", "target_modules", "alpha", "beta", "tau", "M",
    "k_in", "k_out", "delta_max", "r_min", "r_max", "seed",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace():
    return compare.make_workspace(tiny_llama(), data.ByteTokenizer(VOCAB), "tiny-llama", "pydoc-topics", 16, progress=False)


def test_topic_split_is_disjoint_deterministic_and_complete():
    topics = [t for t, _ in data.load_corpus("pydoc-topics")]
    train, val = data.split_topics(topics, 0.2, seed=0)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(topics)
    assert len(val) == math.ceil(0.2 * len(topics))
    assert (train, val) == data.split_topics(list(reversed(topics)), 0.2, seed=0)
    assert val != data.split_topics(topics, 0.2, seed=1)[1]


def test_packed_blocks_never_mix_train_and_validation_topics(workspace):
    d = workspace.data
    assert not set(d.train_topics) & set(d.val_topics)
    assert {topic for topic, _ in d.val_blocks} <= set(d.val_topics)
    assert d.train_blocks.shape[1] == 16 and d.train_blocks.dtype == torch.long
    assert all(2 <= block.numel() <= 16 for _, block in d.val_blocks)
    subset = d.eval_subset(len(d.val_topics))
    assert [t for t, _ in subset] == sorted(d.val_topics)  # round-robin: one block per topic first


def test_text_file_and_stdlib_corpora(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "word " * 300 for i in range(40)), encoding="utf-8")
    docs = data.load_corpus("ignored", str(path))
    assert len(docs) >= 2 and docs == data.load_corpus("ignored", str(path))
    built = data.build_data(docs, data.ByteTokenizer(VOCAB).encode, VOCAB - 1, 32, "text", progress=False)
    assert not set(built.train_topics) & set(built.val_topics)
    stdlib = data.load_corpus("stdlib-source")
    assert len(stdlib) >= 10 and all(text for _, text in stdlib)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("nope")


def test_uniform_ranks_fall_back_to_the_last_layers():
    costs = [1152, 768] * 30  # SmolLM2-135M q_proj, v_proj
    caps = [576, 192] * 30
    ranks, fallback = methods.uniform_ranks(costs, caps, 57_600)
    assert ranks == [1] * 60 and not fallback
    ranks, fallback = methods.uniform_ranks(costs, caps, 2_570)
    assert fallback and ranks[-2:] == [1, 1] and sum(ranks) == 2
    assert sum(r * c for r, c in zip(ranks, costs)) == 1920


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside PEFT's AdaLoRA
@pytest.mark.parametrize("method", list(methods.METHODS))
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
        # AdaLoRA starts at init_r everywhere and prunes to the budget (methods.AdaLoraMethod).
        assert saved["method_details"]["total_rank_budget"] == BUDGET // 65
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
    ws = compare.make_workspace(tiny_gpt2(), data.ByteTokenizer(VOCAB), "tiny-gpt2", "pydoc-topics", 16, progress=False)
    gard = methods.GardSettings(target_modules=["c_attn"], M=2, tau=2, k=4, backend="torch")
    for method in ("gard-dynamic", "uniform"):
        metrics = runner.finetune(method, 300, 1, ws.model, ws.data, TRAIN, gard)
        assert math.isfinite(metrics["primary_metric"]) and metrics["lora_params_mean"] <= 300


def test_evaluate_matches_the_models_own_loss(workspace):
    blocks = [("t", workspace.data.train_blocks[i]) for i in range(3)]
    result = runner.evaluate(workspace.model, blocks, batch_size=2)
    ids = workspace.data.train_blocks[:3]
    with torch.no_grad():
        loss = workspace.model(input_ids=ids, labels=ids).loss
    assert result["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # Padding a short block next to a long one in the same batch changes nothing.
    short = ("t", workspace.data.train_blocks[0][:7])
    alone = runner.evaluate(workspace.model, [short])["ppl"]
    padded = runner.evaluate(workspace.model, [short, ("u", blocks[1][1])], batch_size=2)["per_topic"]["t"]
    assert padded == pytest.approx(alone, rel=1e-5)


def test_compare_resumes_and_refuses_mixed_settings(workspace, tmp_path, monkeypatch):
    runs = compare.plan_grid(["gard-dynamic", "uniform"], [BUDGET], [0, 1], GARD, alphas=[0.5])
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
    other = runner.TrainSettings(**{**TRAIN.to_dict(), "lr": 1e-2})
    with pytest.raises(compare.GridMismatchError, match="other settings"):
        compare.run_grid(workspace, runs, other, tmp_path, progress=False)
    summary = compare.write_results(tmp_path, second, {"ppl": 60.0}, {}, "t")
    assert (tmp_path / "results.md").read_text().count("| gard-dynamic |") == 4  # 2 result rows, 2 paired rows
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


def test_plots_are_non_empty_pngs(workspace, tmp_path):
    runs = compare.plan_grid(["gard-dynamic", "gard-static", "uniform"], [BUDGET], [0, 1], GARD, alphas=[0.5], ks=[2], windows=[3], ablation_seeds=[0])
    base = compare.base_evaluation(workspace, TRAIN, tmp_path, progress=False)
    compare.run_grid(workspace, runs, TRAIN, tmp_path, progress=False, log=lambda *_: None)
    written, skipped = plots.plot_all(tmp_path)
    assert not skipped, skipped
    assert {p.name for p in written} == {
        "fig1_gradient_spectrum.png", "fig3_rank_per_layer.png", "fig4_rank_histogram.png",
        "fig5_ppl_vs_params.png", "fig6_ablation.png", "fig7_per_topic_ppl.png",
    }
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert base["ppl"] > 1.0
