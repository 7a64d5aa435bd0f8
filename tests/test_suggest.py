"""suggest_lora_config: static GARD's ranks as a peft.LoraConfig, the model left exactly as it was."""
import copy
import warnings

import pytest
import torch

import gard_kernels as gk

from .models import batches, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
WINDOW = 4


def _fingerprint(model):
    """Everything suggest_lora_config must leave untouched, compared by identity or bitwise."""
    return {
        "modules": [(name, module, type(module)) for name, module in model.named_modules()],
        "training": [module.training for module in model.modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "grads": [p.grad for p in model.parameters()],
        "params": [(name, p) for name, p in model.named_parameters()],
        "values": {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
    }


def _assert_unchanged(model, before):
    after = _fingerprint(model)
    assert len(after["modules"]) == len(before["modules"])
    for (name, module, kind), (name0, module0, kind0) in zip(after["modules"], before["modules"]):
        assert (name, kind) == (name0, kind0) and module is module0
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is g0 for g, g0 in zip(after["grads"], before["grads"]))
    assert all(p is p0 for (_, p), (_, p0) in zip(after["params"], before["params"]))
    assert after["values"].keys() == before["values"].keys()
    for key, value in after["values"].items():
        assert torch.equal(value, before["values"][key]), key


def _mixed_state(model):
    """Not the state GARD leaves behind: eval model with one block training, a trainable norm,
    and a gradient already stored on it."""
    model.eval()
    norm = next(p for name, p in model.named_parameters() if "ln_f" in name or name.endswith("model.norm.weight"))
    norm.requires_grad_(True)
    norm.grad = torch.full_like(norm, 7.0)
    next(iter(model.children())).train()
    return model


def _reference(model, budget, targets, **options):
    """Static GARD run by hand on a copy: the ranks and parameter count the config must match."""
    twin = copy.deepcopy(model)
    config = gk.GARDConfig(budget=budget, target_modules=targets, mode="static", window=WINDOW, grow_init="zero", **options)
    gard = gk.GARD(twin, config)
    twin.train()
    torch.manual_seed(0)
    gard.profile(batches(8), steps=WINDOW)
    return gard


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_against_reference(config, gard, budget):
    ranks = {name: rank for name, rank in gard.ranks.items() if rank > 0}
    # The case must have rank-0 modules or unequal ranks, else a wrong pattern could pass.
    assert len(ranks) < len(gard.ranks) or len(set(ranks.values())) > 1
    assert set(config.target_modules) == set(ranks)
    assert config.rank_pattern == ranks
    # PEFT's scale must be GARD's scale(r): lora_alpha / r with one scale for every rank, rsLoRA's
    # lora_alpha / sqrt(r) with lora_alpha = scaling * sqrt(r_ref) for the rank-stabilised rule.
    if gard.config.scaling_rule == "rslora":
        assert config.use_rslora is True
        alpha = gard.config.scaling * _reference_rank(gard) ** 0.5
        assert config.lora_alpha == pytest.approx(alpha)
        assert config.alpha_pattern == pytest.approx({name: alpha for name in ranks})
    else:
        assert gard.config.scaling_rule == "constant" and config.use_rslora is False
        assert config.alpha_pattern == {name: gard.config.scaling * rank for name, rank in ranks.items()}
    assert config.inference_mode is False
    assert 0 < gard.num_lora_params <= budget


def _check_peft_model(peft_model, config, gard):
    assert _trainable(peft_model) == gard.num_lora_params
    adapted = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            adapted[name] = module
    assert set(adapted) == set(config.rank_pattern)
    for name, module in adapted.items():
        layer = gard.manager.layers[gard.names.index(name)]
        assert module.lora_A["default"].weight.shape == (layer.rank, layer.d_in)
        assert module.lora_B["default"].weight.shape == (layer.d_out, layer.rank)
        assert module.scaling["default"] == pytest.approx(_gard_scale(gard, layer.rank)) == pytest.approx(layer.scaling)


def _reference_rank(gard):
    """r_ref: the average rank the budget allows over every target layer."""
    return gard.config.budget / sum(layer.d_in + layer.d_out for layer in gard.manager.layers)


def _gard_scale(gard, rank):
    """GARDConfig's scale(r) = scaling * (r_ref / r)^p, written out independently of the code."""
    power = {"constant": 0.0, "rslora": 0.5}[gard.config.scaling_rule]
    return gard.config.scaling * (_reference_rank(gard) / rank) ** power


def test_llama_config_matches_static_gard_and_leaves_the_model(one_thread):
    budget = 900
    model = _mixed_state(tiny_llama())
    before = _fingerprint(model)
    reference = _reference(model, budget, LLAMA_TARGETS, scaling=1.5)
    torch.manual_seed(0)
    config = gk.suggest_lora_config(model, batches(8), budget=budget, target_modules=LLAMA_TARGETS,
                                    window=WINDOW, scaling=1.5, task_type="CAUSAL_LM")
    _assert_unchanged(model, before)
    assert isinstance(config, peft.LoraConfig) and config.task_type == "CAUSAL_LM"
    _check_against_reference(config, reference, budget)
    assert 0 in reference.ranks.values()
    _check_peft_model(peft.get_peft_model(model, config), config, reference)


def test_constant_scaling_rule_gives_alpha_scaling_times_r(one_thread):
    budget = 900
    model = tiny_llama()
    reference = _reference(model, budget, LLAMA_TARGETS, scaling=1.5, scaling_rule="constant")
    torch.manual_seed(0)
    config = gk.suggest_lora_config(model, batches(8), budget=budget, target_modules=LLAMA_TARGETS,
                                    window=WINDOW, scaling=1.5, scaling_rule="constant")
    _check_against_reference(config, reference, budget)
    _check_peft_model(peft.get_peft_model(model, config), config, reference)


def test_gpt2_conv1d_config_sets_fan_in_fan_out(one_thread):
    budget = 1_100
    model = _mixed_state(tiny_gpt2())
    before = _fingerprint(model)
    reference = _reference(model, budget, GPT2_TARGETS)
    torch.manual_seed(0)
    config = gk.suggest_lora_config(model, batches(8), budget=budget, target_modules=GPT2_TARGETS, window=WINDOW)
    _assert_unchanged(model, before)
    _check_against_reference(config, reference, budget)
    assert config.fan_in_fan_out is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.get_peft_model(model, config)
    # PEFT corrects a wrong fan_in_fan_out with a warning; the config must not need correcting.
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    _check_peft_model(peft_model, config, reference)


def test_gpt2_peft_model_computes_what_gard_computes(one_thread, tmp_path):
    # Orientation of the Conv1D factors: PEFT's adapter, loaded back into GARD, gives the same logits.
    model = tiny_gpt2()
    config = gk.suggest_lora_config(model, batches(8), budget=1_100, target_modules=GPT2_TARGETS, window=WINDOW)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    ids = batches(1)[0]["input_ids"]
    model.eval()
    peft_model.eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        expected = peft_model(input_ids=ids).logits
        gard = gk.load_adapter(model, tmp_path)
        got = model(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert gard.num_lora_params == _trainable(peft_model)


def test_loss_fn_and_tuple_batches_give_the_same_config(one_thread):
    def loss_fn(model, batch):
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    tuples = [(b["input_ids"], b["labels"]) for b in batches(8)]
    options = dict(budget=900, target_modules=LLAMA_TARGETS, window=WINDOW)
    expected = gk.suggest_lora_config(tiny_llama(), batches(8), **options)
    got = gk.suggest_lora_config(tiny_llama(), tuples, loss_fn=loss_fn, **options)
    assert got.rank_pattern == expected.rank_pattern


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(mode="dynamic"), ValueError, "static"),
        (dict(interval=5), ValueError, "interval"),
        (dict(ema=0.5, grow_init="gradient"), ValueError, "dynamic"),
        (dict(windw=4), TypeError, "windw"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(target_modules=["nothing"]), ValueError, "matched no module"),
        # GARD wraps the modules before it checks the budget: the model must come back unwrapped.
        (dict(r_min=1, budget=100), ValueError, "budget 100 is below"),
        (dict(budget=10), ValueError, "no layer could ever train"),
        (dict(window=20), ValueError, "more batches"),
    ],
)
def test_bad_options_raise_and_leave_the_model(one_thread, options, error, match):
    model = _mixed_state(tiny_llama())
    before = _fingerprint(model)
    kwargs = dict(budget=900, target_modules=LLAMA_TARGETS, window=WINDOW)
    kwargs.update(options)
    with pytest.raises(error, match=match):
        gk.suggest_lora_config(model, batches(8), **kwargs)
    _assert_unchanged(model, before)


def _labelless():
    return [{"input_ids": b["input_ids"]} for b in batches(8)]


def _tuples():
    return [(b["input_ids"], b["labels"]) for b in batches(8)]


def _failing_after_two(model, batch):
    if _failing_after_two.calls == 2:
        raise RuntimeError("data loader broke")
    _failing_after_two.calls += 1
    return model(**batch).loss


@pytest.mark.parametrize(
    "make_batches, loss_fn, error, match",
    [
        (_labelless, None, ValueError, "no loss"),
        (_tuples, None, TypeError, "pass loss_fn"),
        (batches, lambda model, batch: model(**batch).logits, ValueError, "scalar"),
        (batches, lambda model, batch: torch.tensor(1.0), ValueError, "requires grad"),
        (batches, _failing_after_two, RuntimeError, "data loader broke"),
    ],
)
def test_bad_batches_raise_and_leave_the_model(one_thread, make_batches, loss_fn, error, match):
    _failing_after_two.calls = 0
    model = _mixed_state(tiny_llama())
    before = _fingerprint(model)
    data = make_batches(8) if make_batches is batches else make_batches()
    with pytest.raises(error, match=match):
        gk.suggest_lora_config(model, data, budget=900, target_modules=LLAMA_TARGETS, window=WINDOW, loss_fn=loss_fn)
    _assert_unchanged(model, before)


def test_buffers_updated_in_training_mode_are_restored():
    # BatchNorm updates its running statistics in the training-mode pass.
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).eval()
    before = _fingerprint(model)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 6, generator=generator) for _ in range(WINDOW)]
    config = gk.suggest_lora_config(
        model, data, budget=30, target_modules=["0", "2"], window=WINDOW, loss_fn=lambda m, x: m(x).square().mean()
    )
    _assert_unchanged(model, before)
    assert sum(config.rank_pattern[n] * c for n, c in (("0", 11), ("2", 8)) if n in config.rank_pattern) <= 30


def test_nested_names_get_keys_that_reach_only_their_module(one_thread):
    # "1.0" ends with "0": PEFT's pattern rule would give it the rank of key "0", so the keys are
    # anchored (the export's rule) and each module gets its own rank.
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Sequential(torch.nn.Linear(10, 10)), torch.nn.Linear(10, 4))

    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(5, 12, generator=generator) for _ in range(WINDOW)]
    config = gk.suggest_lora_config(
        make(), data, budget=80, target_modules=["0"], window=WINDOW, r_max=4, score="random", seed=0,
        loss_fn=lambda model, x: model(x).square().mean(),
    )
    assert set(config.rank_pattern) == {"^0", r"^1\.0"}
    outer, nested = config.rank_pattern["^0"], config.rank_pattern[r"^1\.0"]
    assert outer != nested, "the seed must give the two modules different ranks; pick another"
    peft_model = peft.get_peft_model(make(), config)
    inner = peft_model.base_model.model
    assert inner[0].lora_A["default"].weight.shape == (outer, 12)
    assert inner[1][0].lora_A["default"].weight.shape == (nested, 10)
    assert _trainable(peft_model) == outer * (12 + 10) + nested * (10 + 10) <= 80
