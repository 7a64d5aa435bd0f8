"""Optimizer state through rank changes: slice / pad, scalars kept, unmappable state refused."""
import copy

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
    with pytest.raises(TypeError, match=r"Adafactor keeps state\['row_var'\].*elementwise state \(torch.optim.AdamW"):
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


def _late(make_opt, step=5000.0):
    """A rank-2 layer trained a few steps, whose optimizer then believes it is at `step`."""
    layer, opt = _trained(make_opt, rank=2, steps=3)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.as_tensor(step, dtype=state["step"].dtype) if torch.is_tensor(state["step"]) else step
    return layer, opt


def _steady_step(layer, opt, x, target):
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    opt.zero_grad()
    (layer(x) - target).square().sum().backward()
    grads = [p.grad.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    opt.step()
    return [p.detach() - b for p, b in zip((layer.lora_A, layer.lora_B), before)], grads


ADAM_LIKE = [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, amsgrad=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
]


@pytest.mark.parametrize("make_opt", ADAM_LIKE, ids=["adam", "adamw", "adamw_amsgrad", "adam_l2"])
@pytest.mark.parametrize("late_step", [5000.0, 3.0])
def test_grown_directions_run_as_a_fresh_adam(make_opt, late_step):
    torch.manual_seed(0)
    layer, opt = _late(make_opt, late_step)
    lr = opt.param_groups[0]["lr"]
    layer.resize(4, optimizer=opt)
    # A fresh optimizer of the same kind on standalone copies of the grown slices, fed the same
    # gradients: the grown elements must follow it step for step.
    fresh_a = nn.Parameter(layer.lora_A.detach()[2:].clone())
    fresh_b = nn.Parameter(layer.lora_B.detach()[:, 2:].clone())
    fresh = make_opt([fresh_a, fresh_b])
    x, target = torch.randn(16, 9), torch.randn(16, 7)
    for step in range(12):
        (d_a, d_b), (g_a, g_b) = _steady_step(layer, opt, x, target)
        fresh_a.grad, fresh_b.grad = g_a[2:].clone(), g_b[:, 2:].clone()
        fresh.step()
        assert torch.allclose(layer.lora_A[2:], fresh_a, rtol=1e-5, atol=1e-7), step
        assert torch.allclose(layer.lora_B[:, 2:], fresh_b, rtol=1e-5, atol=1e-7), step
        if step == 0:
            # A fresh Adam's first update is lr * g / (|g| + eps): lr per element up to eps.
            assert g_b[:, 2:].abs().min() > 0
            assert d_b[:, 2:].abs().max() <= lr * (1 + 1e-5) and d_a[2:].abs().max() <= lr * (1 + 1e-5)


def test_adam_zero_padded_moments_were_the_defect():
    # Without the seeding (the state's mark removed), the same grow overshoots: proof that the
    # test above measures the mechanism, not a lucky gradient.
    from gard_kernels.lora.optim_state import NEW_KEY

    layer, opt = _late(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    layer.resize(4, optimizer=opt)
    for state in opt.state.values():
        state.pop(NEW_KEY, None)
    (d_a, d_b), _ = _steady_step(layer, opt, torch.randn(16, 9), torch.randn(16, 7))
    assert d_b[:, 2:].abs().max() > 2.5 * 1e-2


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_grown_direction_is_no_larger_than_fresh(nesterov):
    layer, opt = _late(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=nesterov))
    layer.resize(4, optimizer=opt)
    (d_a, d_b), (g_a, g_b) = _steady_step(layer, opt, torch.randn(16, 9), torch.randn(16, 7))
    # A fresh SGD's first momentum buffer is the gradient itself: update lr * (1 + momentum * nesterov) * g.
    fresh = 1e-2 * (1.0 + 0.9 * nesterov) * g_b[:, 2:].abs()
    assert torch.all(d_b[:, 2:].abs() <= fresh * (1 + 1e-6))


def test_resize_to_zero_starts_the_optimizer_afresh():
    layer, opt = _late(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    layer.resize(0, optimizer=opt)
    layer.resize(3, optimizer=opt)
    assert layer.lora_A not in opt.state and layer.lora_B not in opt.state


def test_new_direction_marks_survive_a_checkpoint():
    from gard_kernels.lora.optim_state import NEW_KEY, track_new_directions

    torch.manual_seed(3)
    layer, opt = _late(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    layer.resize(4, optimizer=opt)
    x, target = torch.randn(16, 9), torch.randn(16, 7)
    _steady_step(layer, opt, x, target)
    assert opt.state[layer.lora_B][NEW_KEY][:, 2:].eq(2).all() and opt.state[layer.lora_B][NEW_KEY][:, :2].eq(0).all()
    twin = LoRALayer(nn.Linear(9, 7), 4)
    twin.load_state_dict(layer.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    # A saved checkpoint, not live references to the tensors the original keeps updating.
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    track_new_directions(twin_opt)
    for _ in range(2):
        _steady_step(layer, opt, x, target)
        _steady_step(twin, twin_opt, x, target)
    assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.lora_B, twin.lora_B)
