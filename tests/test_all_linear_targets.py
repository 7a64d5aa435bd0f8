"""target_modules="all-linear", PEFT's shorthand: every Linear / Conv1D of a transformers model but
its output layer, wherever GARD takes target modules (GARDConfig, the command line, the
pre-load budget checks, the PEFT export, suggest_lora_config, the AdaLoRA baseline)."""
import json

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import gard_kernels as gk
from gard_kernels import cli
from gard_kernels.experiments import workspace
from gard_kernels.experiments.preflight import target_modules_argument
from gard_kernels.lora.layer import is_conv1d
from gard_kernels.lora.manager import find_targets, match_target_modules
from gard_kernels.lora.peft_format import ADAPTER_CONFIG_NAME

from .models import batches, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_TARGETS = [name.rsplit(".", 1)[1] for name in LLAMA_PROJECTIONS]
GPT2_CONV1DS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
# Tiny Llama, 2 layers: one rank unit on all 14 projections costs 928 parameters.
UNIT = 928
CLI_FAST = ["--tokenizer", "bytes", "--max-len", "16", "--batch-size", "2", "--steps", "2", "--eval-blocks", "4",
            "--test-blocks", "0", "--window", "2", "--k", "4", "--backend", "torch", "--no-progress"]


def _llama_projections(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{projection}" for i in range(layers) for projection in LLAMA_PROJECTIONS]


def _tied_llama() -> LlamaForCausalLM:
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _config(targets, **overrides) -> gk.GARDConfig:
    base = dict(budget=4 * UNIT, target_modules=targets, window=2, k_in=4, k_out=4, backend="torch", seed=1)
    return gk.GARDConfig(**(base | overrides))


# Selection


@pytest.mark.parametrize("make_model", [tiny_llama, _tied_llama], ids=["untied", "tied"])
@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_all_linear_selects_every_llama_projection_and_not_the_lm_head(make_model, spelling):
    model = make_model()
    # The head is an nn.Linear like the projections: only the output-layer rule leaves it out.
    assert isinstance(model.lm_head, nn.Linear)
    assert match_target_modules(model, spelling) == _llama_projections()


def test_all_linear_selects_gpt2s_conv1d_layers_and_not_the_lm_head():
    model = tiny_gpt2()
    targets = find_targets(model, "all-linear")
    assert [t.name for t in targets] == [f"transformer.h.{i}.{name}" for i in range(2) for name in GPT2_CONV1DS]
    assert all(is_conv1d(t.module) for t in targets) and isinstance(model.lm_head, nn.Linear)


def test_the_output_layer_is_left_out_under_every_name_and_shared_layers_are_listed_once():
    model = tiny_llama()
    model.head_alias = model.lm_head  # the output layer registered a second time
    up_proj = model.model.layers[0].mlp.up_proj
    model.shared_up = up_proj  # a projection registered a second time
    targets = find_targets(model, "all-linear")
    assert [t.name for t in targets] == _llama_projections()
    assert [t.paths for t in targets if t.module is up_proj] == [("model.layers.0.mlp.up_proj", "shared_up")]


def test_all_linear_refuses_a_model_without_an_output_layer_to_leave_out():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    message = r'"all-linear" needs a transformers model whose output layer it can leave out.*a list.*regular expression'
    with pytest.raises(ValueError, match=message):
        find_targets(model, "all-linear")
    before = list(model.named_modules())
    with pytest.raises(ValueError, match=message):
        gk.GARD(model, _config("all-linear"))
    assert list(model.named_modules()) == before


def test_all_linear_inside_a_list_is_explained():
    with pytest.raises(ValueError, match='shorthand only as the whole value: target_modules="all-linear", not a list'):
        find_targets(tiny_llama(), ["all-linear"])


# GARD, suggest_lora_config, the AdaLoRA baseline


def test_gard_with_all_linear_equals_gard_with_the_explicit_list():
    built = {}
    for targets in ("all-linear", LLAMA_TARGETS):
        gard = gk.GARD(tiny_llama(), _config(targets, grow_init="zero"))
        before = (gard.names, gard.manager.costs, gard.config.r_max)
        gard.profile(batches(2, seed=3))
        built[str(targets)] = before, gard.ranks
    (names, costs, r_max), ranks = built["all-linear"]
    assert names == _llama_projections() and sum(costs) == UNIT
    assert built[str(LLAMA_TARGETS)] == built["all-linear"]
    # The allocation moved ranks apart, so equal ranks are not equal by construction.
    assert len(set(ranks.values())) > 1


def test_suggest_lora_config_with_all_linear_names_the_modules():
    options = dict(budget=4 * UNIT, window=2, k_in=4, k_out=4, backend="torch", seed=1)
    shorthand = gk.suggest_lora_config(tiny_llama(), batches(2, seed=3), target_modules="all-linear", **options)
    explicit = gk.suggest_lora_config(tiny_llama(), batches(2, seed=3), target_modules=LLAMA_TARGETS, **options)
    assert shorthand.target_modules != "all-linear" and set(shorthand.target_modules) <= set(_llama_projections())
    assert shorthand.rank_pattern == explicit.rank_pattern and len(set(shorthand.rank_pattern.values())) > 1


def test_adalora_baseline_adapts_the_all_linear_modules():
    from gard_kernels.experiments.method import MethodRun
    from gard_kernels.experiments.presets import build_method, method_options
    from gard_kernels.experiments.settings import GardSettings

    model = tiny_llama()
    model.requires_grad_(False)
    settings = GardSettings(target_modules="all-linear", r_max=16, window=2, backend="torch")
    method = build_method(MethodRun("adalora", model, 4 * UNIT, settings, 0, 6, 1e-2, method_options("adalora")))
    adapted = [name.removeprefix("base_model.model.") for name, module in method.model.named_modules()
               if isinstance(module, peft.tuners.adalora.AdaLoraLayer)]
    assert adapted == _llama_projections()


# PEFT export


@pytest.mark.parametrize("make_model, projections", [(tiny_llama, LLAMA_PROJECTIONS), (tiny_gpt2, GPT2_CONV1DS)])
def test_peft_export_names_the_modules_and_reproduces_the_logits(tmp_path, make_model, projections):
    model = make_model()
    gard = gk.GARD(model, _config("all-linear", budget=1_500, mode="dynamic", window=2, interval=2, warmup=2,
                                  delta_max=3, r_max=6, score="random", ema=0.0, scaling=1.5))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for batch in batches(6, seed=4):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    live = {name: r for name, r in gard.ranks.items() if r > 0}
    assert len(set(live.values())) > 1  # per-module ranks that only rank_pattern can carry
    gard.save_pretrained(tmp_path)

    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["target_modules"] == list(live) and config["rank_pattern"] == live
    assert all(name.endswith(tuple(projections)) for name in live) and "lm_head" not in config["target_modules"]
    peft_model = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    for name, r in gard.ranks.items():
        module = peft_model.base_model.model.get_submodule(name)
        assert (module.r["default"] if r else 0) == r, name
    batch = batches(1, seed=8)[0]
    with torch.no_grad():
        expected = model.eval()(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(peft_model(input_ids=batch["input_ids"]).logits, expected, rtol=1e-5, atol=1e-5)


# Command line


def _run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_target_modules_argument_passes_the_shorthand_through():
    assert target_modules_argument(["all-linear"]) == "all-linear"
    assert target_modules_argument(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"'all-linear' \(every linear layer but the output layer\) must be the only value"):
        target_modules_argument(["all-linear", "q_proj"])


def test_finetune_takes_target_modules_all_linear(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run_cli(["finetune", "--method", "uniform", "--budget", 2 * UNIT, "--model", model_dir,
                                  "--out", out, "--target-modules", "all-linear", *CLI_FAST], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapted_modules"] == _llama_projections()
    assert metrics["hyperparameters"]["target_modules"] == "all-linear"
    assert metrics["lora_params_final"] == 2 * UNIT


def test_compare_checks_all_linear_budgets_before_the_model_loads(model_dir, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the runs were checked")

    monkeypatch.setattr(workspace, "load_workspace", refuse)
    # r_min = 1 on every module needs one rank unit on all 14 projections (928; 1,024 with the
    # lm_head): the skeleton model (meta device) resolves "all-linear" as the loaded one would.
    code, out, err = _run_cli(["compare", "--methods", "gard", "--budgets", UNIT - 1, "--seeds", "0", "--r-min", "1",
                               "--target-modules", "all-linear", "--model", model_dir, *CLI_FAST], capsys)
    assert code == 2 and f"budget {UNIT - 1} is below the minimum of gard on this model ({UNIT} parameters" in err, err
    code, out, err = _run_cli(["finetune", "--method", "gard", "--target-modules", "all-linear", "q_proj",
                               "--model", "/nonexistent"], capsys)
    assert code == 2 and "must be the only value" in err and err.count("\n") == 1, err
