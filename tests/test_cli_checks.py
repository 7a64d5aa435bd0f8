"""The command line checks what it can before the model loads, takes --target-modules as a regex
as documented, and its help says what the demo does."""
import json
from pathlib import Path

import pytest

from gard_kernels import cli
from gard_kernels.experiments import models, workspace

from .models import tiny_llama

FAST = ["--tokenizer", "bytes", "--max-len", "16", "--batch-size", "2", "--steps", "2", "--eval-blocks", "4",
        "--test-blocks", "0", "--window", "2", "--k", "4", "--backend", "torch", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the runs were checked")

    monkeypatch.setattr(workspace, "load_workspace", refuse)


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        # tiny_llama's cheapest adapted module is v_proj: d_in + d_out = 32 + 16.
        (["compare", "--methods", "uniform", "gard", "--budgets", "10", "--seeds", "0"],
         "budget 10 is below the minimum of uniform on this model (48 parameters"),
        (["finetune", "--method", "gard", "--budget", "400", "--target-modules", "qproj"],
         "target_modules=['qproj'] matched no module; adaptable module names end in"),
        (["finetune", "--method", "gard", "--budget", "400", "--target-modules", r"layers\.9\..*"],
         "one string is read as a regular expression"),
    ],
)
def test_runs_are_checked_against_the_models_shapes_before_it_loads(args, message, model_dir, no_loading, capsys):
    code, out, err = run_cli([*args, "--model", model_dir, *FAST], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_without_a_skeleton_the_runs_are_checked_before_the_data_is_packed(model_dir, monkeypatch, capsys):
    """A .gguf model gets no skeleton (reading its config costs a third of the load): its runs are
    checked right after the weights load, before anything else."""
    from gard_kernels.experiments import preflight

    def no_skeleton(source):
        raise AssertionError("a skeleton was built")

    def no_packing(*args, **kwargs):
        raise AssertionError("the data was packed before the runs were checked")

    monkeypatch.setattr(preflight, "skeleton_model", no_skeleton)
    monkeypatch.setattr(workspace, "make_workspace", no_packing)
    monkeypatch.setattr(models, "resolve_model", lambda spec: models.ModelSource(Path(model_dir), "model.gguf"))
    monkeypatch.setattr(workspace, "load_model", lambda source, **kwargs: (tiny_llama(), None))
    code, out, err = run_cli(["compare", "--methods", "uniform", "--budgets", "10", "--seeds", "0", "--model", model_dir, *FAST], capsys)
    assert code == 2 and "budget 10 is below the minimum of uniform on this model (48 parameters" in err, err


@pytest.mark.parametrize(
    "values, message",
    [
        (["q_proj("], "--target-modules 'q_proj(' is not a valid regular expression"),
        (["q_proj", ".*v_proj"], "'.*v_proj' is a regular expression, which must be the only value"),
    ],
)
def test_bad_target_module_patterns_are_refused_before_anything(values, message, monkeypatch, capsys):
    monkeypatch.setattr(workspace, "load_workspace", None)
    code, out, err = run_cli(["finetune", "--method", "gard", "--target-modules", *values, "--model", "/nonexistent"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_target_modules_takes_a_regular_expression(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", "uniform", "--budget", "400", "--model", model_dir, "--out", out,
                                 "--target-modules", r"model\.layers\.1\..*_proj", *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["adapted_modules"]) == 7
    assert all(name.startswith("model.layers.1.") for name in metrics["adapted_modules"])


def test_optional_gard_options_take_none(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["finetune", "--method", "gard-paper-static", "--budget", "400", "--model", model_dir,
                                 "--out", out, *FAST, "--r-max", "none", "--r-init", "None"], capsys)
    assert code == 0, err
    hyper = json.loads((out / "metrics.json").read_text())["hyperparameters"]
    assert hyper["r_max"] is None and hyper["r_init"] is None
    code, out, err = run_cli(["finetune", "--method", "gard", "--r-init", "two"], capsys)
    assert code == 2 and "invalid int value: 'two'" in err


def test_help_texts_say_what_the_cli_takes(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    demo = commands["demo"].format_help()
    for fact in ("SmolLM2-135M", "60 AdamW steps (the study's 100", "average rank 8", "About 15 minutes", "runs/demo/<timestamp>", "results.md"):
        assert fact in demo, fact
    assert "DEMO_PRESET" not in demo
    options = {a.dest: a.help for a in commands["finetune"]._actions}
    for name in ("r_init", "warmup", "r_max", "min_valid_steps"):
        assert "none for None" in options[name], name
    assert "read as that regular expression" in options["target_modules"]


def test_a_static_profile_longer_than_the_run_is_refused_before_the_model_loads(capsys):
    code, out, err = run_cli(["finetune", "--method", "gard", "--steps", "3", "--model", "/nonexistent"], capsys)
    assert code == 2 and "gard profiles its first window=4 batches (static mode), but --steps is 3" in err, err
