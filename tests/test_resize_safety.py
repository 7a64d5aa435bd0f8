"""Construction, profiling and multi-layer resizes that never leave a model half-changed."""
import copy

import pytest
import torch
from torch import nn

import gard_kernels as gk
from gard_kernels import controller as controller_module
from gard_kernels.lora.layer import LoRALayer

from .models import batches, tiny_gpt2, tiny_llama
from .util import rel_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _fingerprint(model: nn.Module):
    """Module types along every path, requires_grad flags and parameter values."""
    return (
        [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        {name: p.detach().clone() for name, p in model.named_parameters()},
    )


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize("bad", [
    dict(budget=200, r_init=2),  # r_init over the budget
    dict(budget=100, r_min=1),  # r_min infeasible at this budget
    dict(budget=10_000, r_min=40),  # r_min above min(d_in, d_out)
    dict(budget=10_000, target_modules=["nothing_like_this"]),
])
def test_refused_config_leaves_the_model_exactly_as_it_was(bad):
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    before = _fingerprint(model)
    options = dict(target_modules=["q_proj", "v_proj"]) | bad
    with pytest.raises(ValueError):
        gk.GARD(model, gk.GARDConfig(**options))
    assert _same(before, _fingerprint(model))
    # The retry the error message suggests works on the same model.
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"]))
    assert gard.num_lora_params > 0


def test_error_half_way_through_construction_unwraps(monkeypatch):
    model = tiny_llama()
    before = _fingerprint(model)

    def broken_ring(*args, **kwargs):
        raise RuntimeError("ring allocation failed")

    monkeypatch.setattr(controller_module, "SketchRing", broken_ring)
    with pytest.raises(RuntimeError, match="ring allocation failed"):
        gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"]))
    assert _same(before, _fingerprint(model))


def _trained_gard(mode="dynamic", **options):
    model = tiny_llama(layers=3)
    cfg = gk.GARDConfig(
        budget=3_000, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], mode=mode, window=3, interval=3,
        warmup=3, r_init=1, score="random", ema=0.0, seed=1, **options,
    )
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    return model, gard, opt


def test_multi_layer_resize_is_all_or_nothing(monkeypatch):
    model, gard, opt = _trained_gard()
    data = batches(3, seed=4)
    for batch in data[:2]:
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    model(**data[2]).loss.backward()
    opt.step()
    opt.zero_grad()
    snap = [layer.snapshot(opt) for layer in gard.manager.layers]
    ranks = gard.manager.ranks
    calls = {"n": 0}
    real_resize = LoRALayer.resize

    def fail_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("resize failed")
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(LoRALayer, "resize", fail_on_third)
    with pytest.raises(RuntimeError, match="resize failed"):
        gard.step()  # step 3: a re-allocation that moves several layers
    assert calls["n"] >= 3
    assert gard.manager.ranks == ranks
    for layer, old in zip(gard.manager.layers, snap):
        assert torch.equal(layer.lora_A, old["factors"][0]) and torch.equal(layer.lora_B, old["factors"][1])
        for param, state in zip((layer.lora_A, layer.lora_B), old["state"]):
            assert state.keys() == opt.state[param].keys()
            assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(opt.state[param][k])) for k in state)


def test_profile_in_dynamic_mode_with_gradient_grow():
    model, gard, opt = _trained_gard(grow_init="gradient", delta_max=3)
    before = gard.manager.ranks
    event = gard.profile(batches(3, seed=2))
    assert event["ranks"] != before and gard.num_lora_params <= gard.config.budget
    grown = [i for i, (a, b) in enumerate(zip(before, event["ranks"])) if b > a]
    assert grown
    # The grown rows came from the range finder: gradient directions of norm exactly 1/sqrt(3)
    # (the mean norm of a random init row, which a random row never has exactly).
    for i in grown:
        rows = gard.manager.layers[i].lora_A[before[i]:]
        assert torch.allclose(rows.norm(dim=1), torch.full((rows.shape[0],), 3 ** -0.5), atol=1e-5)
    assert all(not handle.armed for handle in gard.handles)


def test_profile_clears_every_gradient_it_made_and_keeps_the_others():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], mode="static", window=3, grow_init="zero"))
    model.lm_head.weight.requires_grad_(True)  # a head the user trains besides the adapters
    norm = model.model.norm.weight
    norm.requires_grad_(True)
    norm.grad = torch.full_like(norm, 7.0)  # a gradient the user accumulated before profiling
    gard.profile(batches(3))
    assert model.lm_head.weight.grad is None
    assert torch.equal(norm.grad, torch.full_like(norm, 7.0))
    assert all(p.grad is None for p in gard.lora_parameters())


def test_profile_consumes_exactly_the_batches_it_uses():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], mode="static", window=3, grow_init="zero"))
    data = batches(5)
    stream = iter(data)
    gard.profile(stream, steps=3)
    assert next(stream) is data[3]
    with pytest.raises(ValueError, match="got 1 batches but needs steps=3"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=10_000, target_modules=["q_proj"], mode="static", window=3, grow_init="zero")).profile(
            stream, steps=3
        )


class _SharedProjection(nn.Module):
    """One Linear registered under two names (encoder and decoder share it), plus a plain one."""

    def __init__(self):
        super().__init__()
        proj = nn.Linear(12, 12)
        self.enc = nn.Module()
        self.dec = nn.Module()
        self.enc.proj = proj
        self.dec.proj = proj
        self.other = nn.Linear(12, 12)

    def forward(self, x):
        return self.dec.proj(torch.tanh(self.enc.proj(x))) + self.other(x)


@pytest.mark.parametrize("targets", [["proj"], ["dec.proj"], ["enc.proj"], "dec\\.proj"])
def test_a_shared_module_is_adapted_on_every_path(targets):
    model = _SharedProjection()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=targets, r_init=2, window=2, interval=2))
    assert gard.names == ["enc.proj"]  # one adapter, one budget entry, under its first name
    assert model.enc.proj is model.dec.proj and isinstance(model.dec.proj, LoRALayer)
    assert gard.num_lora_params == 2 * 24


def test_shared_module_sketch_is_the_gradient_of_both_uses():
    model = _SharedProjection()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["proj"], r_init=2, window=2, interval=2))
    layer = model.enc.proj
    with torch.no_grad():
        layer.lora_B.normal_()
    twin = copy.deepcopy(model)
    merged = twin.enc.proj.base
    with torch.no_grad():
        merged.weight += layer.delta_weight()
    merged.weight.requires_grad_(True)
    twin.enc.proj = twin.dec.proj = merged
    x = torch.randn(5, 12)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    sk = gard.handles[0].sketch
    expected = sk.p_out.double().T @ merged.weight.grad.double() @ sk.p_in.double()
    got = gard.ring.buffer[0, gard.ring.slot].view(gard.config.k_out, gard.config.k_in)
    assert rel_error(got, expected) < 1e-4


# Configurations whose resizes meet the optimizer's state (static mode's allocation from
# gard.profile comes before the first step and is checked at profile(), test_quantized.py).
RESIZES_AFTER_STEPS = [{"mode": "dynamic"}, {"mode": "static", "score": "update_nuclear", "grow_init": "zero"}]


@pytest.mark.parametrize("options", RESIZES_AFTER_STEPS, ids=["dynamic", "in-loop-static"])
def test_factored_optimizer_is_refused_when_attached(options):
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], **options))
    with pytest.raises(TypeError, match=r"Adafactor.*(row_var|col_var).*AdamW"):
        gard.attach_optimizer(torch.optim.Adafactor(gard.lora_parameters(), lr=1e-2))
    assert gard.optimizer is None
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-2))


@pytest.mark.parametrize("options", RESIZES_AFTER_STEPS, ids=["dynamic", "in-loop-static"])
def test_quantised_state_is_refused_when_attached(options):
    class QuantisedAdam(torch.optim.Optimizer):
        """Keeps an int8 first moment, like 8-bit optimizers do."""

        def __init__(self, params, lr=1e-3):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        state = self.state[p]
                        state.setdefault("m", torch.zeros_like(p, dtype=torch.int8))
                        p.add_(p.grad.sign(), alpha=-group["lr"])

    gard = gk.GARD(tiny_gpt2(), gk.GARDConfig(budget=10_000, target_modules=["c_attn"], **options))
    with pytest.raises(TypeError, match=r"QuantisedAdam keeps state\['m'\] as torch.int8"):
        gard.attach_optimizer(QuantisedAdam(gard.lora_parameters()))


def test_static_reinitialisation_starts_the_optimizer_afresh():
    model = tiny_llama()
    cfg = gk.GARDConfig(budget=3_000, target_modules=["q_proj", "v_proj"], mode="static", window=2, r_init=1,
                        score="update_nuclear", grow_init="gora")
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for batch in batches(2):
        model(**batch).loss.backward()
        opt.step()
        event = gard.step()
        opt.zero_grad()
    assert event is not None  # the one allocation, at step M = 2
    assert all(p not in opt.state for p in gard.lora_parameters())


def test_profile_puts_back_the_same_gradient_tensors():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], mode="static", window=2, grow_init="zero"))
    head = model.lm_head.weight
    head.requires_grad_(True)
    grad = torch.full_like(head, 3.0)
    head.grad = grad
    gard.profile(batches(2))
    assert head.grad is grad and torch.equal(grad, torch.full_like(head, 3.0))
