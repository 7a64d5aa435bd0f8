"""grow_init="gora": grown directions start as one gradient step along the gradient's top directions."""
import copy
import math

import pytest
import torch
from torch import nn

import gard_kernels as gk
from gard_kernels.lora.capture import CaptureHandle
from gard_kernels.lora.layer import LoRALayer
from gard_kernels.sketch import GradientSketch

from .models import batches, tiny_llama

D_IN, D_OUT = 13, 9


def _captured_layer(rank, lr, scaling=2.0):
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(D_IN, D_OUT), rank, scaling=scaling)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT, k_in=4, k_out=4), out=torch.zeros(4, 4))
    # p >= rank of G: the range finder is exact.
    layer.capture.arm_range_finder(D_IN, generator=torch.Generator().manual_seed(1))
    x, dy = torch.randn(40, D_IN), torch.randn(40, D_OUT)
    (layer(x) * dy).sum().backward()
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    return layer, opt, dy.double().T @ x.double()  # G [d_out, d_in]


@pytest.mark.parametrize("scaling", [2.0, 0.5])
def test_gora_grow_is_one_gradient_step_on_the_new_directions(scaling):
    lr, old, new = 3e-3, 2, 5
    layer, opt, g = _captured_layer(old, lr, scaling)
    delta_before = layer.delta_weight().detach().double()
    old_a = layer.lora_A.detach().double().clone()
    record = layer.resize(new, grow_init="gora", optimizer=opt)
    assert record.init == "gora"
    rows = layer.lora_A.detach().double()[old:]
    # Same A rows as the "gradient" init: the gradient's top directions outside the old rows.
    e = torch.linalg.qr(old_a.T).Q
    v = torch.linalg.svd(g - (g @ e) @ e.T).Vh[: new - old]
    proj = rows.T @ torch.linalg.solve(rows @ rows.T, rows)  # projector onto the new rows
    assert torch.linalg.matrix_norm(proj - v.T @ v) < 1e-5
    # The added product is -xi G P_new with GoRA's xi = lr sqrt(d_in / r).
    xi = lr * math.sqrt(D_IN / new)
    added = layer.delta_weight().detach().double() - delta_before
    expected = -xi * g @ proj
    assert torch.linalg.matrix_norm(added - expected) < 1e-5 * torch.linalg.matrix_norm(expected)


def test_gora_grow_lowers_the_loss_it_was_built_from():
    torch.manual_seed(3)
    layer = LoRALayer(nn.Linear(D_IN, D_OUT), 1)
    layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT, k_in=4, k_out=4), out=torch.zeros(4, 4))
    layer.capture.arm_range_finder(8)
    x, target = torch.randn(64, D_IN), torch.randn(64, D_OUT)
    loss = (layer(x) - target).square().mean()
    loss.backward()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.resize(4, grow_init="gora", optimizer=opt)
    with torch.no_grad():
        assert (layer(x) - target).square().mean() < loss


def test_gora_grow_needs_an_optimizer():
    layer, opt, _ = _captured_layer(1, 1e-3)
    with pytest.raises(ValueError, match="pass the optimizer"):
        layer.resize(3, grow_init="gora")
    assert layer.rank == 1


def test_dynamic_gard_with_gora_grow_trains_within_budget():
    model = tiny_llama(layers=2)
    cfg = gk.GARDConfig(
        budget=1_500, target_modules=["q_proj", "v_proj"], window=2, interval=2, warmup=2, r_init=1,
        grow_init="gora", score="grad_norm", delta_max=2, seed=2,
    )
    gard = gk.GARD(model, cfg)
    with pytest.raises(RuntimeError, match="attach the optimizer"):
        gard.profile(batches(2, seed=3))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    grew = False
    for batch in batches(8, seed=4):
        model(**batch).loss.backward()
        opt.step()
        event = gard.step()
        opt.zero_grad()
        grew |= event is not None and any(b > a for a, b in zip(event["old_ranks"], event["ranks"]))
        assert gard.num_lora_params <= cfg.budget
    assert grew


def test_static_gard_with_gora_init_takes_one_gradient_step_at_allocation():
    # r_init = 0: the profiled model is the base model, so the last profiling batch's gradient of
    # each base weight is exactly what the range finder saw (rank <= 8 tokens < its 16 columns).
    model = tiny_llama(layers=1)
    twin = copy.deepcopy(model)
    cfg = gk.GARDConfig(
        budget=300, target_modules=["q_proj", "v_proj"], mode="static", window=2, r_init=0, r_max=4,
        score="grad_norm", grow_init="gora", scaling=2.0,
    )
    gard = gk.GARD(model, cfg)
    data = batches(2, batch=1, length=8, seed=5)
    with pytest.raises(RuntimeError, match="attach the optimizer"):
        gk.GARD(copy.deepcopy(twin), cfg).profile(data)
    lr = 1e-2
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=lr))
    gard.profile(data)
    grown = [(name, layer) for name, layer in zip(gard.names, gard.manager.layers) if layer.rank > 0]
    assert grown
    for name, layer in grown:
        weight = twin.get_submodule(name).weight
        weight.requires_grad_(True)
        (g,) = torch.autograd.grad(twin(**data[-1]).loss, weight)
        g = g.double()
        a = layer.lora_A.detach().double()
        projector = a.T @ torch.linalg.solve(a @ a.T, a)
        v = torch.linalg.svd(g).Vh[: layer.rank]
        assert torch.linalg.matrix_norm(projector - v.T @ v) < 1e-4
        expected = -lr * math.sqrt(layer.d_in / layer.rank) * g @ projector
        assert torch.allclose(layer.delta_weight().double(), expected, rtol=1e-3, atol=1e-7)


def test_gora_step_uses_the_base_rate_under_a_warmup_schedule():
    lr = 3e-3
    layer, opt, g = _captured_layer(1, lr)
    # A linear warm-up from 0: the momentary rate is 0 at the first step.
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
    assert opt.param_groups[0]["lr"] == 0.0
    layer.resize(3, grow_init="gora", optimizer=opt)
    assert layer.lora_B.detach()[:, 1:].abs().max() > 0
