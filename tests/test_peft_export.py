"""PEFT-format export: PEFT reproduces the GARD model, merges it, and GARD reads the adapter back."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import gard_kernels as gk
from gard_kernels.lora.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from gard_kernels.lora.layer import LoRALayer

from .models import batches, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])]


def _config(targets, **overrides) -> gk.GARDConfig:
    base = dict(
        budget=1_500, target_modules=targets, window=2, interval=2, warmup=2, delta_max=3, r_max=6,
        score="random", ema=0.0, seed=2, scaling=1.5,
        # In-loop static profiling (no gard.profile) and one scale at every rank: alpha = 1.5 r.
        grow_init="zero", scaling_rule="constant",
    )
    return gk.GARDConfig(**(base | overrides))


def _continue_training(gard, lr: float, steps: int) -> None:
    """A few AdamW steps of a loaded run, GARD stepped after each."""
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=lr)
    gard.attach_optimizer(opt)
    gard.model.train()
    for batch in batches(steps, seed=6):
        gard.model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()


def _trained(make_model, targets, **overrides):
    """A GARD model after a few steps with unequal ranks, one layer at rank 0."""
    model = make_model()
    gard = gk.GARD(model, _config(targets, **overrides))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=2e-2)
    gard.attach_optimizer(opt)
    for batch in batches(6, seed=4):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    gard.manager.layers[0].resize(0, optimizer=opt)
    ranks = list(gard.ranks.values())
    assert 0 in ranks and len(set(r for r in ranks if r)) > 1
    return model.eval(), gard


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("make_model, targets", CASES)
def test_peft_reproduces_gard_and_merges(tmp_path, make_model, targets):
    model, gard = _trained(make_model, targets)
    gard.save_pretrained(tmp_path)
    batch = batches(1, seed=8)[0]
    expected = _logits(model, batch)

    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    live = {name: r for name, r in gard.ranks.items() if r > 0}
    assert config["peft_type"] == "LORA" and config["target_modules"] == list(live)
    assert config["rank_pattern"] == live
    assert config["alpha_pattern"] == pytest.approx({name: 1.5 * r for name, r in live.items()})
    assert config["fan_in_fan_out"] == (make_model is tiny_gpt2)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    assert len(tensors) == 2 * len(live)
    for layer in gard.manager.layers:
        if layer.rank:
            assert tensors[f"base_model.model.{layer.name}.lora_A.weight"].shape == (layer.rank, layer.d_in)
            assert tensors[f"base_model.model.{layer.name}.lora_B.weight"].shape == (layer.d_out, layer.rank)

    peft_model = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    for name, r in gard.ranks.items():
        module = peft_model.base_model.model.get_submodule(name)
        assert (module.r["default"] if r else 0) == r, name
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-5, atol=2e-5)


def test_rslora_scales_export_as_peft_rslora(tmp_path):
    """scaling_rule="rslora": PEFT's use_rslora with one lora_alpha = scaling * sqrt(r_ref), and
    PEFT (and GARD reading it back) computes the rank-dependent scales of the resized layers."""
    model, gard = _trained(tiny_llama, LLAMA_TARGETS, scaling_rule="rslora")
    live = {name: r for name, r in gard.ranks.items() if r > 0}
    r_ref = 1_500 / sum(layer.d_in + layer.d_out for layer in gard.manager.layers)
    scales = {name: layer.scaling for name, layer in zip(gard.names, gard.manager.layers) if layer.rank}
    assert scales == pytest.approx({name: 1.5 * (r_ref / r) ** 0.5 for name, r in live.items()})
    assert len(set(scales.values())) > 1
    gard.save_pretrained(tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["use_rslora"] is True and config["rank_pattern"] == live
    assert config["lora_alpha"] == pytest.approx(1.5 * r_ref**0.5)
    assert config["alpha_pattern"] == pytest.approx({name: 1.5 * r_ref**0.5 for name in live})
    batch = batches(1, seed=8)[0]
    expected = _logits(model, batch)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for name, r in live.items():
        assert peft_model.base_model.model.get_submodule(name).scaling["default"] == pytest.approx(scales[name])
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    resumed = gk.load_adapter(tiny_llama(), tmp_path, config=_config(LLAMA_TARGETS, scaling_rule="rslora"))
    assert [layer.scaling for layer in resumed.manager.layers if layer.rank] == pytest.approx(list(scales.values()))
    torch.testing.assert_close(_logits(resumed.model.eval(), batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, targets", CASES)
def test_load_adapter_continues_at_saved_ranks(tmp_path, make_model, targets):
    model, gard = _trained(make_model, targets)
    gard.save_pretrained(tmp_path)
    batch = batches(1, seed=8)[0]

    # With the run's config every adapted layer comes back, rank-0 ones included.
    resumed = gk.load_adapter(make_model(), tmp_path, config=_config(targets))
    assert resumed.ranks == gard.ranks
    torch.testing.assert_close(_logits(resumed.model.eval(), batch), _logits(model, batch), rtol=1e-5, atol=1e-5)
    _continue_training(resumed, lr=1e-2, steps=3)
    assert resumed.num_lora_params <= resumed.config.budget

    # Without a config: the adapter's modules only, at their ranks, scaling from lora_alpha / r.
    alone = gk.load_adapter(make_model(), tmp_path)
    assert alone.ranks == {name: r for name, r in gard.ranks.items() if r > 0}
    assert alone.config.scaling == pytest.approx(1.5) and alone.config.budget == gard.num_lora_params
    torch.testing.assert_close(_logits(alone.model.eval(), batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"score": "update_nuclear"}], ids=["defaults", "in-loop-static"])
def test_static_run_continues_the_loaded_adapter_without_reallocating(tmp_path, options):
    """Static mode: the loaded ranks are the allocation. No profile is asked for (the default,
    marginal gain, needs one before a fresh run), and no re-allocation at step `window` throws
    the loaded factors away."""
    make_model = tiny_llama
    model, gard = _trained(make_model, LLAMA_TARGETS)
    gard.save_pretrained(tmp_path)
    config = gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, window=2, r_max=6, scaling=1.5, **options)
    resumed = gk.load_adapter(make_model(), tmp_path, config=config)
    loaded_b = {name: layer.lora_B.detach().clone() for name, layer in zip(resumed.names, resumed.manager.layers)}
    _continue_training(resumed, lr=1e-3, steps=4)
    assert resumed.ranks == gard.ranks and not [r for r in resumed.history if "reallocation" in r]
    for name, layer in zip(resumed.names, resumed.manager.layers):
        if layer.rank:
            # Four small steps from the loaded factors, not a re-initialisation (B = 0).
            assert (layer.lora_B - loaded_b[name]).norm() < 0.5 * loaded_b[name].norm(), name


def test_load_adapter_folds_peft_scaling_and_rejects_misfits(tmp_path):
    base = tiny_llama()
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(base, lora).eval()
    peft_model.save_pretrained(tmp_path)
    batch = batches(1, seed=3)[0]
    both = ["q_proj", "v_proj"]
    gard = gk.load_adapter(tiny_llama(), tmp_path, config=gk.GARDConfig(budget=2_000, target_modules=both))
    assert set(gard.ranks.values()) == {4, 2}
    torch.testing.assert_close(_logits(gard.model.eval(), batch), _logits(peft_model, batch), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="budget 100"):
        gk.load_adapter(tiny_llama(), tmp_path, config=gk.GARDConfig(budget=100, target_modules=both))
    with pytest.raises(ValueError, match="v_proj.*not among"):
        gk.load_adapter(tiny_llama(), tmp_path, config=gk.GARDConfig(budget=2_000, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank 4, above r_max=3"):
        gk.load_adapter(tiny_llama(), tmp_path, config=gk.GARDConfig(budget=2_000, target_modules=both, r_max=3))
    # A refused adapter leaves the model unwrapped.
    model = tiny_llama()
    with pytest.raises(ValueError):
        gk.load_adapter(model, tmp_path, config=gk.GARDConfig(budget=100, target_modules=both))
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _Nested(nn.Module):
    """"extra.model.proj" ends with ".model.proj": PEFT's suffix rules would confuse the two."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = _Block()
        self.extra = nn.Module()
        self.extra.model = _Block()

    def forward(self, x):
        return self.extra.model.proj(self.model.proj(x))


@pytest.mark.parametrize(
    "targets, ranks", [(r"model\.proj", {"model.proj": 3}), (["proj"], {"model.proj": 3, "extra.model.proj": 1})]
)
def test_export_is_unambiguous_for_nested_names(tmp_path, targets, ranks):
    model = _Nested()
    gard = gk.GARD(model, gk.GARDConfig(budget=200, target_modules=targets, r_init=0))
    generator = torch.Generator().manual_seed(1)
    for layer in gard.manager.layers:
        layer.resize(ranks[layer.name])
        layer.lora_B.data.normal_(generator=generator)
    gard.save_pretrained(tmp_path)
    x = torch.randn(5, 8, generator=generator)
    with torch.no_grad():
        expected = model(x)
        peft_model = peft.PeftModel.from_pretrained(_Nested(), tmp_path)
        got = peft_model(x)
    adapted = {name: m.r["default"] for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "r")}
    assert adapted == ranks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert gk.load_adapter(_Nested(), tmp_path).ranks == ranks


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_load_adapter_without_config_trains_as_peft_does(tmp_path, use_rslora):
    """An adapter with unequal ranks loaded without a config keeps PEFT's scale at every rank
    (lora_alpha / r, or / sqrt(r) with use_rslora): B as saved, nothing folded, so the factors'
    gradients are PEFT's and a resize follows PEFT's rule."""
    lora = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2, "down_proj": 3},
        init_lora_weights=False, use_rslora=use_rslora,
    )
    peft_model = peft.get_peft_model(tiny_llama(), lora)
    peft_model.save_pretrained(tmp_path)
    gard = gk.load_adapter(tiny_llama(), tmp_path)
    assert gard.config.scaling_rule == ("rslora" if use_rslora else "linear")
    assert len(set(gard.ranks.values())) == 3
    batch = batches(1, seed=3)[0]
    peft_model(**batch).loss.backward()
    gard.model(**batch).loss.backward()
    for name, layer in zip(gard.names, gard.manager.layers):
        theirs = peft_model.base_model.model.get_submodule(name)
        assert layer.scaling == pytest.approx(theirs.scaling["default"], rel=1e-12), name
        assert torch.equal(layer.lora_B.detach(), theirs.lora_B["default"].weight.detach()), name
        torch.testing.assert_close(layer.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
        # A resize keeps PEFT's rule: at rank 1 the scale is lora_alpha / 1 either way.
        assert layer.scale_at(1) == pytest.approx(6.0), name
