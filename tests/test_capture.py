"""LoRACaptureFunction and CaptureHandle: gradients, the sketch written in backward, range finder."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gard_kernels import GradientSketch, reference
from gard_kernels.lora import capture as capture_mod
from gard_kernels.lora.capture import CaptureHandle, lora_capture
from gard_kernels.lora.layer import LoRALayer
from tests.util import SKETCH_TOLERANCE, poisoned, rel_error

D_IN, D_OUT = 77, 45


def _conv1d(d_in, d_out):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(d_out, d_in)


def _layer(kind="linear", rank=3, d_in=D_IN, d_out=D_OUT, k=(6, 5)):
    base = nn.Linear(d_in, d_out) if kind == "linear" else _conv1d(d_in, d_out)
    layer = LoRALayer(base, rank, scaling=0.7, name=kind)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.capture = CaptureHandle(GradientSketch(d_in, d_out, k_in=k[0], k_out=k[1], seed=3))
    layer.capture.out = torch.zeros(k[1], k[0])
    return layer


def _expected(layer, pairs):
    """Float64 oracle of the sketch summed over (x, dy) pairs."""
    sk = layer.capture.sketch
    return sum(reference.sketch(x, dy, sk.p_in, sk.p_out) for x, dy in pairs)


def _backward(layer, x, dy):
    """One forward/backward with a chosen output gradient; returns the true dY (retain_grad)."""
    y = layer(x)
    y.retain_grad()
    (y * dy).sum().backward()
    return y.grad


def _max_sin_angle(u, v):
    """sin of the largest principal angle between the row spaces of u [k, d] and v [k, d]."""
    qu = torch.linalg.qr(u.double().T).Q
    qv = torch.linalg.qr(v.double().T).Q
    return torch.linalg.matrix_norm(qv - qu @ (qu.T @ qv), ord=2).item()


def test_gradcheck_float64_with_capture_on():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    handle = CaptureHandle(GradientSketch(7, 5, k_in=4, k_out=4))
    handle.out = torch.zeros(4, 4)
    handle.arm_range_finder(3)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_capture(x, a, b, 0.5, handle), (x, a, b))
    assert handle.out.abs().sum() > 0 and handle.range_tokens > 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_capture_gradients_match_plain_path(kind):
    layer = _layer(kind)
    x = torch.randn(4, 9, D_IN)
    dy = torch.randn(4, 9, D_OUT)
    grads = []
    for out in (torch.zeros(5, 6), None):
        layer.capture.out = out
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        _backward(layer, xi, dy)
        grads.append((xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for captured, plain in zip(*grads):
        assert rel_error(captured, plain) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_sketch_equals_reference_of_true_output_gradient(kind, x_requires_grad):
    layer = _layer(kind)
    x = torch.randn(3, 11, D_IN, requires_grad=x_requires_grad)
    true_dy = _backward(layer, x, torch.randn(3, 11, D_OUT))
    assert rel_error(layer.capture.out, _expected(layer, [(x, true_dy)])) < SKETCH_TOLERANCE[torch.float32]


def test_gradient_accumulation_sums_backward_passes():
    layer = _layer()
    pairs = []
    for n in (13, 6):
        x = torch.randn(n, D_IN)
        pairs.append((x, _backward(layer, x, torch.randn(n, D_OUT))))
    assert rel_error(layer.capture.out, _expected(layer, pairs)) < SKETCH_TOLERANCE[torch.float32]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_autocast_bfloat16_on_cpu(kind):
    layer = _layer(kind)
    x = torch.randn(2, 17, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.retain_grad()
    (y.float() * torch.randn(2, 17, D_OUT)).sum().backward()
    # The branch ran on bf16(x), as nn.Linear under autocast would; that is what gets sketched.
    expected = _expected(layer, [(x.detach().bfloat16(), y.grad)])
    assert rel_error(layer.capture.out, expected) < SKETCH_TOLERANCE[torch.bfloat16]
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    captured = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    layer.capture.out = None
    x.grad = None
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x)
    y2.backward(y.grad)
    for got, plain in zip(captured, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert rel_error(got, plain) < 1e-2


def test_rank0_frozen_layer_without_input_grad_is_still_sketched():
    layer = _layer(rank=0)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    x = torch.randn(5, 4, D_IN)
    true_dy = _backward(layer, x, torch.randn(5, 4, D_OUT))
    assert rel_error(layer.capture.out, _expected(layer, [(x, true_dy)])) < SKETCH_TOLERANCE[torch.float32]
    # The anchor is not a Parameter: optimizers never see it.
    assert [name for name, _ in layer.named_parameters()] == ["lora_A", "lora_B", "base.weight", "base.bias"]


def test_capture_off_uses_plain_ops(monkeypatch):
    def refuse(*args):
        raise AssertionError("LoRACaptureFunction used while capture is off")

    monkeypatch.setattr(capture_mod.LoRACaptureFunction, "apply", refuse)
    layer = _layer()
    calls = []
    layer.capture.sketch = lambda *args, **kwargs: calls.append(1)
    layer.capture.out = None
    _backward(layer, torch.randn(3, D_IN, requires_grad=True), torch.randn(3, D_OUT))
    layer.capture = None
    _backward(layer, torch.randn(3, D_IN), torch.randn(3, D_OUT))
    assert calls == []


def test_out_is_read_at_backward_time():
    layer = _layer()
    slot = poisoned((5, 6))
    layer.capture.out = slot
    y = layer(torch.randn(3, D_IN))
    layer.capture.out = None  # the controller turned capture off before backward
    y.sum().backward()
    assert torch.isnan(slot).all()

    layer.capture.out = torch.zeros(5, 6)
    with torch.no_grad():
        layer(torch.randn(3, D_IN))
    assert layer.capture.out.abs().sum() == 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_does_not_double_count(use_reentrant):
    layer = _layer()
    x = torch.randn(2, 7, D_IN, requires_grad=True)
    dy = torch.randn(2, 7, D_OUT)
    y = checkpoint(layer, x, use_reentrant=use_reentrant)
    (y * dy).sum().backward()
    assert rel_error(layer.capture.out, _expected(layer, [(x, dy)])) < SKETCH_TOLERANCE[torch.float32]
    assert layer.lora_A.grad is not None


def _planted(n, d_in, d_out, rank):
    """(x, dy) with G = dY^T X of the given rank and well separated singular values."""
    v = torch.linalg.qr(torch.randn(d_in, rank)).Q  # [d_in, rank]
    c = torch.randn(n, rank) * torch.linspace(3.0, 1.0, rank)
    return c @ v.T, torch.randn(n, d_out)


def test_range_finder_recovers_top_right_singular_vectors():
    handle = CaptureHandle(GradientSketch(D_IN, D_OUT))
    handle.arm_range_finder(8, generator=torch.Generator().manual_seed(1))
    x, dy = _planted(70, D_IN, D_OUT, 5)
    pairs = [(x[:30], dy[:30]), (x[30:], dy[30:])]
    for x, dy in pairs:
        handle.record(x, dy)
    g = sum(dy.double().T @ x.double() for x, dy in pairs)
    v_true = torch.linalg.svd(g).Vh
    directions = handle.top_input_directions(3)
    assert directions.shape == (3, D_IN)
    assert torch.allclose(directions @ directions.T, torch.eye(3), atol=1e-5)
    assert _max_sin_angle(directions, v_true[:3]) < 1e-4

    # Complement of existing rows: top right singular vectors of G (I - P).
    exclude = torch.randn(2, D_IN)
    e = torch.linalg.qr(exclude.double().T).Q
    v_rest = torch.linalg.svd(g - (g @ e) @ e.T).Vh
    directions = handle.top_input_directions(3, exclude=exclude)
    assert (directions.double() @ e).abs().max() < 1e-5
    assert _max_sin_angle(directions, v_rest[:3]) < 1e-4


def test_range_finder_errors():
    handle = CaptureHandle(GradientSketch(D_IN, D_OUT))
    with pytest.raises(RuntimeError, match="not armed"):
        handle.top_input_directions(2)
    handle.arm_range_finder(4)
    with pytest.raises(RuntimeError, match="no backward pass"):
        handle.top_input_directions(2)
    handle.record(torch.randn(3, D_IN), torch.randn(3, D_OUT))
    with pytest.raises(ValueError, match="p=4"):
        handle.top_input_directions(5)
    handle.disarm()
    assert not handle.armed


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backward_inside_autocast_captures_with_every_backend(backend):
    # loss.backward() inside the autocast block: the sketch's matmuls must not be recast.
    from gard_kernels import available_backends

    from .models import batches, tiny_llama

    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built here")
    import gard_kernels as gk

    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], mode="static", window=2, r_init=1, backend=backend))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batches(1)[0]).loss.backward()
    written = gard.ring.buffer[:, gard.ring.slot]
    assert torch.isfinite(written).all() and (written.norm(dim=1) > 0).all()


def test_a_buffer_on_another_device_follows_the_activations():
    # The model moved after the handle was made (a Trainer's model.to(device)): the handle asks
    # its owner to re-point the buffer, then sketches there. ("meta" stands in for the old device.)
    layer = _layer()
    layer.capture.out = torch.zeros(5, 6, device="meta")
    x, dy = torch.randn(9, D_IN), torch.randn(9, D_OUT)
    with pytest.raises(ValueError, match="sketch buffer is on meta but the layer ran on cpu"):
        _backward(layer, x, dy)
    moved = []

    def follow(device):
        moved.append(device)
        layer.capture.buffer = torch.zeros(5, 6, device=device)  # the handle accumulates into it

    layer.capture.on_new_device = follow
    layer.capture.out = torch.zeros(5, 6, device="meta")
    true_dy = _backward(layer, x, dy)
    assert moved == [torch.device("cpu")]
    assert rel_error(layer.capture.out, _expected(layer, [(x, true_dy)])) < SKETCH_TOLERANCE[torch.float32]


def test_gard_repoints_every_handle_when_the_ring_moves():
    # "meta" stands in for the GPU here (it holds no data: a real round trip runs in the CUDA test).
    from gard_kernels import GARD, GARDConfig
    from tests.models import tiny_llama

    gard = GARD(tiny_llama(), GARDConfig(budget=2000, window=2, interval=2, warmup=0, k_in=4, k_out=4, backend="torch"))
    gard.ema_statistic = torch.ones(len(gard.handles))
    gard._follow_device(torch.device("meta"))
    assert gard.ring.device.type == "meta" and gard.ema_statistic.device.type == "meta"
    assert all(t.device.type == "meta" for t in (gard.ring.open, gard.ring.valid, gard.ring.num_invalid_per_layer))
    for index, handle in enumerate(gard.handles):
        assert handle.buffer._base is gard.ring.open and handle.buffer.shape == (4, 4)
        assert handle.buffer.storage_offset() == gard.ring.current(index).storage_offset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gard_built_on_the_cpu_trains_like_one_built_on_the_gpu():
    from gard_kernels import GARD, GARDConfig
    from tests.models import batches, tiny_llama

    config = GARDConfig(budget=2000, window=2, interval=2, warmup=0, k_in=4, k_out=4, seed=3)
    runs = []
    for move_first in (False, True):
        model = tiny_llama()
        if move_first:
            model.cuda()
        gard = GARD(model, config)
        model.cuda()  # e.g. transformers.Trainer moving the model it was given
        opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
        gard.attach_optimizer(opt)
        for batch in batches(5):
            batch = {k: v.cuda() for k, v in batch.items()}
            model(**batch).loss.backward()
            opt.step()
            gard.step()
            opt.zero_grad()
        runs.append((gard.ring.buffer.cpu(), [h["ranks"] for h in gard.history]))
    assert runs[0][1] == runs[1][1]
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-6)
