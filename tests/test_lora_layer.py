"""LoRALayer: forward against a float64 reference, resize (grow / shrink) and training through resizes."""
import math

import pytest
import torch
from torch import nn

from gard_kernels import GradientSketch
from gard_kernels.lora.capture import CaptureHandle
from gard_kernels.lora.layer import LoRALayer
from tests.util import rel_error

D_IN, D_OUT = 77, 45


def _base(kind, d_in=D_IN, d_out=D_OUT):
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(d_out, d_in)


def _layer(kind="linear", rank=5, scaling=0.7):
    layer = LoRALayer(_base(kind), rank, scaling=scaling, name=kind)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _reference_forward(layer, x):
    """Float64 y = x W^T + b + scaling x A^T B^T, with W in Linear layout."""
    w = layer.base.weight.double()
    w = w if isinstance(layer.base, nn.Linear) else w.T
    x = x.double()
    lora = (x @ layer.lora_A.double().T) @ layer.lora_B.double().T
    return x @ w.T + layer.base.bias.double() + layer.scaling * lora


def _max_sin_angle(u, v):
    qu = torch.linalg.qr(u.double().T).Q
    qv = torch.linalg.qr(v.double().T).Q
    return torch.linalg.matrix_norm(qv - qu @ (qu.T @ qv), ord=2).item()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rank", [0, 1, 6])
def test_forward_matches_float64_reference(kind, rank):
    layer = _layer(kind, rank)
    assert (layer.d_in, layer.d_out) == (D_IN, D_OUT)
    assert layer.lora_A.shape == (rank, D_IN) and layer.lora_B.shape == (D_OUT, rank)
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(3, 10, D_IN)
    assert rel_error(layer(x), _reference_forward(layer, x)) < 1e-6
    delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert rel_error(layer.delta_weight(), delta) < 1e-6


def test_new_layer_computes_base_and_uses_peft_init():
    layer = LoRALayer(nn.Linear(D_IN, D_OUT), 64)
    x = torch.randn(4, D_IN)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_B.abs().max() == 0
    bound = 1 / math.sqrt(D_IN)
    assert layer.lora_A.abs().max() <= bound
    assert abs(layer.lora_A.norm(dim=1).mean().item() - 1 / math.sqrt(3)) < 0.05


def test_rejects_other_modules_and_bad_ranks():
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALayer(nn.Conv2d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="non-negative int"):
        LoRALayer(nn.Linear(4, 4), -1)
    with pytest.raises(ValueError, match="grow_init"):
        LoRALayer(nn.Linear(4, 4), 1).resize(2, grow_init="svd")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("start", [0, 4])
def test_grow_keeps_output_and_identity(kind, start):
    layer = _layer(kind, start)
    a, b = layer.lora_A, layer.lora_B
    old_a = a.detach().clone()
    x = torch.randn(6, D_IN)
    before = layer(x).detach()
    record = layer.resize(start + 3, generator=torch.Generator().manual_seed(0))
    assert layer.lora_A is a and layer.lora_B is b
    assert (layer.rank, record.old_rank, record.new_rank) == (start + 3, start, start + 3)
    assert record.kept == tuple(range(start)) and record.init == "zero" and record.discarded_norm == 0.0
    assert torch.equal(a[:start], old_a) and b[:, start:].abs().max() == 0
    assert torch.allclose(layer(x), before, rtol=1e-6, atol=1e-6)

    # Gradient init, from the range finder armed during a captured backward pass.
    layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT, k_in=4, k_out=4))
    layer.capture.out = torch.zeros(4, 4)
    layer.capture.arm_range_finder(6)
    layer(torch.randn(20, D_IN)).square().sum().backward()
    record = layer.resize(start + 7, grow_init="gradient")
    assert record.init == "gradient"
    assert torch.allclose(layer(x), before, atol=1e-6)
    assert torch.allclose(a[start + 3 :].norm(dim=1), torch.full((4,), 1 / math.sqrt(3)), atol=1e-5)


def test_gradient_grow_finds_planted_directions():
    layer = _layer(rank=2)
    handle = layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT))
    handle.out = torch.zeros(16, 16)
    handle.arm_range_finder(10, generator=torch.Generator().manual_seed(2))
    # Planted G = dY^T X of rank 6: X = C V^T with separated scales.
    v = torch.linalg.qr(torch.randn(D_IN, 6)).Q
    x = (torch.randn(64, 6) * torch.tensor([8.0, 6, 4, 2, 1, 0.5])) @ v.T
    dy = torch.randn(64, D_OUT)
    y = layer(x)
    (y * dy).sum().backward()
    g = dy.double().T @ x.double()
    old_a = layer.lora_A.detach().double().clone()
    e = torch.linalg.qr(old_a.T).Q  # existing directions
    v_expected = torch.linalg.svd(g - (g @ e) @ e.T).Vh[:3]
    layer.resize(5, grow_init="gradient")
    new_rows = layer.lora_A.detach()[2:]
    assert _max_sin_angle(new_rows, v_expected) < 1e-4
    assert (new_rows.double() @ e).abs().max() < 1e-5
    # They lie in the planted row space of G, seen from the complement of the old rows.
    w = torch.linalg.qr(v.double() - e @ (e.T @ v.double())).Q
    assert (new_rows.double() - (new_rows.double() @ w) @ w.T).norm() < 1e-4 * new_rows.norm()


def test_gradient_grow_needs_an_armed_handle():
    layer = _layer(rank=1)
    with pytest.raises(RuntimeError, match="capture handle"):
        layer.resize(3, grow_init="gradient")
    layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT))
    with pytest.raises(RuntimeError, match="not armed"):
        layer.resize(3, grow_init="gradient")
    assert layer.rank == 1 and layer.lora_A.shape == (1, D_IN)


def test_norm_shrink_keeps_strongest_directions_and_their_state():
    layer = _layer(rank=5)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(torch.randn(8, D_IN)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        layer.lora_B.mul_(torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0]) / layer.lora_B.norm(dim=0))
        layer.lora_A.div_(layer.lora_A.norm(dim=1, keepdim=True))
    keep = [0, 2, 4]
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    state_a = {k: v.clone() for k, v in opt.state[layer.lora_A].items()}
    state_b = {k: v.clone() for k, v in opt.state[layer.lora_B].items()}
    delta_before = layer.delta_weight().detach().double()

    record = layer.resize(3, shrink="norm", optimizer=opt)
    assert record.kept == tuple(keep)
    assert torch.equal(layer.lora_A, a[keep]) and torch.equal(layer.lora_B, b[:, keep])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[layer.lora_A][key], state_a[key][keep])
        assert torch.equal(opt.state[layer.lora_B][key], state_b[key][:, keep])
    assert torch.equal(opt.state[layer.lora_A]["step"], state_a["step"])
    discarded = (delta_before - layer.delta_weight().double()).norm().item()
    assert abs(record.discarded_norm - discarded) < 1e-5 * discarded


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_svd_shrink_is_best_rank_r_approximation(kind):
    layer = _layer(kind, rank=7)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(4, D_IN)).sum().backward()
    opt.step()
    delta = layer.delta_weight().detach().double()
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    a = layer.lora_A
    record = layer.resize(3, shrink="svd", optimizer=opt)
    assert layer.lora_A is a and record.kept == "svd"
    assert rel_error(layer.delta_weight(), best) < 1e-5
    assert abs(record.discarded_norm - s[3:].norm().item()) < 1e-5 * s[3:].norm().item()
    # Balanced split: both factors carry S^1/2.
    assert torch.allclose(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0), rtol=1e-4)
    assert layer.lora_A not in opt.state and layer.lora_B.grad is None
    layer(torch.randn(4, D_IN)).sum().backward()
    opt.step()


def test_svd_shrink_of_rank_deficient_update_pads_fresh_directions():
    layer = LoRALayer(nn.Linear(4, 3), 9, scaling=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    best = layer.delta_weight().detach()
    layer.resize(5, shrink="svd")
    assert layer.lora_A.shape == (5, 4) and layer.lora_B.shape == (3, 5)
    assert rel_error(layer.delta_weight(), best) < 1e-5
    # Only 3 directions carry Delta W; the other 2 restart as new ones (random A row, zero B).
    assert (layer.lora_A[3:].norm(dim=1) > 0.1).all() and layer.lora_B[:, 3:].abs().max() == 0


def test_svd_shrink_of_zero_update_leaves_trainable_directions():
    layer = LoRALayer(nn.Linear(D_IN, D_OUT), 0)
    layer.resize(4)
    layer.resize(2, shrink="svd")
    assert layer.lora_A.norm(dim=1).min() > 0.1 and layer.lora_B.abs().max() == 0
    layer(torch.randn(3, D_IN)).square().sum().backward()
    assert layer.lora_B.grad.abs().max() > 0


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["adamw", "sgd_momentum"])
def test_training_continues_through_random_resizes(make_opt):
    torch.manual_seed(1)
    layers = [LoRALayer(nn.Linear(13, 11), 2, name="l0"), LoRALayer(_base("conv1d", 11, 9), 0, name="l1")]
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1])
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    opt = make_opt(params)
    for layer in layers:
        layer.capture = CaptureHandle(GradientSketch(layer.d_in, layer.d_out, k_in=4, k_out=4))
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(9)
    for step in range(40):
        for layer in layers:
            capture_on = step % 3 != 0
            layer.capture.out = torch.zeros(4, 4) if capture_on else None
            if capture_on:
                layer.capture.arm_range_finder(6, generator=gen)
        loss = (model(torch.randn(5, 13)) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert math.isfinite(loss.item())
        for layer in layers:
            new_rank = int(torch.randint(0, 7, (1,), generator=gen))
            grow_init = "gradient" if layer.capture.armed and layer.capture.range_tokens else "zero"
            shrink = ("norm", "svd")[step % 2]
            layer.resize(new_rank, grow_init=grow_init, shrink=shrink, optimizer=opt, generator=gen)
            assert layer.rank == new_rank
    for p in params:
        assert any(p is q for q in opt.param_groups[0]["params"])
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == p.shape


def _flipping_svd(real):
    """torch.linalg.svd as another LAPACK build may return it: every singular pair's sign flipped."""

    def svd(m, *args, **kwargs):
        out = real(m, *args, **kwargs)
        return type(out)((-out.U, out.S, -out.Vh))

    return svd


@pytest.mark.parametrize("resize", ["gradient grow", "svd shrink"])
def test_resized_factors_do_not_depend_on_the_sign_lapack_returns(resize, monkeypatch):
    # A 16-core machine's torch returned singular vectors of the other sign and a grown A row came
    # out negated; the largest-magnitude entry of every new A row is now positive on any build.
    results = []
    for flip in (False, True):
        torch.manual_seed(0)
        layer = _layer(rank=7 if resize == "svd shrink" else 2)
        handle = layer.capture = CaptureHandle(GradientSketch(D_IN, D_OUT))
        handle.out = torch.zeros(16, 16)
        handle.arm_range_finder(6, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            layer.lora_B.normal_()
        (layer(torch.randn(32, D_IN)) * torch.randn(32, D_OUT)).sum().backward()
        if flip:
            monkeypatch.setattr(torch.linalg, "svd", _flipping_svd(torch.linalg.svd))
        if resize == "svd shrink":
            layer.resize(3, shrink="svd")
        else:
            layer.resize(5, grow_init="gradient")
        monkeypatch.undo()
        rows = layer.lora_A.detach()[2:] if resize == "gradient grow" else layer.lora_A.detach()
        assert (rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all()
        results.append((layer.lora_A.detach().clone(), layer.lora_B.detach().clone()))
    (a0, b0), (a1, b1) = results
    assert torch.allclose(a0, a1, atol=1e-6) and torch.allclose(b0, b1, atol=1e-6)
