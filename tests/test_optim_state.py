"""Optimizer state through rank changes: slice / pad, scalars kept, unmappable state refused."""
import pytest
import torch
from torch import nn

from gard_kernels.lora.layer import LoRALayer
from gard_kernels.lora.optim_state import (
    check_remappable,
    remap_along,
    remap_optimizer_state,
    reset_optimizer_state,
)


def _trained(make_opt, rank=4, steps=2):
    layer = LoRALayer(nn.Linear(9, 7), rank)
    opt = make_opt(layer.parameters())
    for _ in range(steps):
        layer(torch.randn(5, 9)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return layer, opt


def test_remap_along_slices_and_zero_pads():
    t = torch.arange(12.0).reshape(3, 4)
    out = remap_along(t, torch.tensor([3, 1]), 5, dim=1)
    assert torch.equal(out, torch.tensor([[3.0, 1, 0, 0, 0], [7, 5, 0, 0, 0], [11, 9, 0, 0, 0]]))
    assert remap_along(t, torch.tensor([], dtype=torch.long), 2, dim=0).abs().sum() == 0


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.RMSprop(ps, momentum=0.5),
], ids=["adam_amsgrad", "sgd_momentum", "rmsprop"])
def test_every_parameter_shaped_state_follows(make_opt):
    layer, opt = _trained(make_opt)
    p = layer.lora_B  # [7, 4], rank dim 1
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    index = torch.tensor([2, 0])
    remap_optimizer_state(opt, p, index, 3, dim=1)
    for key, old in before.items():
        new = opt.state[p][key]
        if isinstance(old, torch.Tensor) and old.dim() > 0:
            assert new.shape == (7, 3)
            assert torch.equal(new[:, :2], old[:, [2, 0]]) and new[:, 2].abs().sum() == 0
        else:
            assert new is old or torch.equal(new, old)  # scalar state (step) kept


def test_state_of_a_parameter_without_state_is_left_alone():
    layer = LoRALayer(nn.Linear(9, 7), 2)
    opt = torch.optim.AdamW(layer.parameters())
    remap_optimizer_state(opt, layer.lora_A, torch.arange(2), 5, dim=0)
    remap_optimizer_state(None, layer.lora_A, torch.arange(2), 5, dim=0)
    assert len(opt.state) == 0


def test_factored_optimizer_raises_clear_error_before_anything_changes():
    layer, opt = _trained(lambda ps: torch.optim.Adafactor(ps, lr=1e-2))
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with pytest.raises(TypeError, match=r"Adafactor keeps state\['row_var'\].*optimizer=None"):
        layer.resize(2, optimizer=opt)
    assert layer.rank == 4 and torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b)
    with pytest.raises(TypeError, match="Adafactor"):
        check_remappable(opt, [layer.lora_A])
    # Without the optimizer the resize goes through; the caller rebuilds the optimizer.
    layer.resize(2)
    assert layer.lora_A.shape == (2, 9)


def test_non_tensor_state_is_refused():
    layer, opt = _trained(lambda ps: torch.optim.SGD(ps, lr=0.1))
    opt.state[layer.lora_A]["history"] = [torch.zeros(3)]
    with pytest.raises(TypeError, match=r"SGD keeps state\['history'\] \(list\)"):
        layer.resize(6, optimizer=opt)


def test_reset_drops_state_and_adam_restarts_cleanly():
    layer, opt = _trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3), steps=50)
    reset_optimizer_state(opt, layer.lora_A)
    assert layer.lora_A not in opt.state and layer.lora_B in opt.state
    before = layer.lora_A.detach().clone()
    layer(torch.randn(5, 9)).square().mean().backward()
    opt.step()
    assert opt.state[layer.lora_A]["step"].item() == 1
    # A fresh Adam step moves each element by about lr (plus decoupled weight decay), not 3 lr.
    assert (layer.lora_A - before).abs().max() < 1.1e-3


def test_grow_and_norm_shrink_carry_existing_grads():
    layer = LoRALayer(nn.Linear(9, 7), 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(5, 9)).square().mean().backward()
    grad_a = layer.lora_A.grad.clone()
    layer.resize(5)
    assert torch.equal(layer.lora_A.grad[:3], grad_a) and layer.lora_A.grad[3:].abs().sum() == 0
    record = layer.resize(2, shrink="norm")
    assert torch.equal(layer.lora_A.grad, grad_a[list(record.kept)])
    assert layer.lora_B.grad.shape == (7, 2)


def test_resize_while_previous_graph_is_alive():
    layer = LoRALayer(nn.Linear(9, 7), 3)
    loss = layer(torch.randn(5, 9)).square().mean()
    loss.backward()
    for new_rank in (6, 2, 5, 1):
        layer.resize(new_rank)
        # `loss` still holds the previous graph (and the old gradient accumulators).
        loss = layer(torch.randn(5, 9)).square().mean()
        loss.backward()
        assert layer.lora_A.grad.shape == (new_rank, 9)
        layer.zero_grad()
