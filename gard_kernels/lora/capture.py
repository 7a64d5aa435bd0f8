"""Gradient capture for LoRA layers: the autograd Function that sketches dY^T X in backward.

The LoRA branch of a layer is added to the base output, so the gradient arriving at the branch
is dY of the whole layer. `LoRACaptureFunction` computes the branch, and in backward feeds the
input it saved for dA anyway, together with that dY, to the layer's `CaptureHandle`: the
GradientSketch (into the ring's open slot `handle.out`) and, when armed, the RangeFinder
(range_finder.py) whose output seeds new LoRA directions on a gradient-initialised grow.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from ..sketch import GradientSketch
from .gain_probe import GainProbe
from .range_finder import RangeFinder

__all__ = ["CaptureHandle", "LoRACaptureFunction", "lora_capture"]


class CaptureHandle:
    """Per-layer capture state, shared by the layer and the controller.

    Args:
        sketch: GradientSketch of the layer (d_in, d_out of the layer).
        out: [k_out, k_in] float32 buffer the sketch accumulates into, e.g. a view of the ring's
            open slot (set once: the ring keeps that memory fixed), or None (capture off).
        backend: sketch backend, see GradientSketch.__call__.
        on_new_device: called with the activations' device when a backward pass runs on another
            device than `out` (the model moved after the handle was made); it must re-point `out`
            there. Without it such a pass is refused.

    Attributes:
        buffer: the `out` given (or assigned later).
        enabled: capture on/off switch (the controller's schedule).
        range_finder: RangeFinder fed by the same backward passes while armed.
        gain_probe: GainProbe fed by the same backward passes while recording (score="marginal_gain").
    """

    def __init__(
        self,
        sketch: GradientSketch,
        out: torch.Tensor | None = None,
        backend: str = "auto",
        on_new_device: Callable[[torch.device], None] | None = None,
    ):
        self.sketch = sketch
        self.buffer = out
        self.backend = backend
        self.on_new_device = on_new_device
        self.enabled = True
        self.range_finder = RangeFinder(sketch.d_in, sketch.d_out)
        self.gain_probe = GainProbe(sketch.d_in, sketch.d_out)

    def __repr__(self) -> str:
        return (
            f"CaptureHandle({self.sketch!r}, capturing={self.capturing}, backend={self.backend!r}, "
            f"{self.range_finder!r})"
        )

    @property
    def out(self) -> torch.Tensor | None:
        """Where backward passes write sketches now: `buffer` while enabled, else None."""
        return self.buffer if self.enabled else None

    @out.setter
    def out(self, value: torch.Tensor | None) -> None:
        self.buffer = value

    @property
    def capturing(self) -> bool:
        """Whether backward passes write sketches now."""
        return self.out is not None

    @property
    def active(self) -> bool:
        """Whether backward passes have anything to record (a sketch, the range finder or the gain probe)."""
        return self.capturing or self.range_finder.armed or self.gain_probe.recording

    # The range finder's verbs, where the layer and its tests reach them.
    @property
    def armed(self) -> bool:
        return self.range_finder.armed

    @property
    def range_tokens(self) -> int:
        return self.range_finder.tokens

    def arm_range_finder(self, p: int, generator: torch.Generator | None = None) -> None:
        """RangeFinder.arm: accumulate G's range over the next backward passes."""
        self.range_finder.arm(p, generator)

    def disarm(self) -> None:
        """RangeFinder.disarm."""
        self.range_finder.disarm()

    def top_input_directions(self, r: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """RangeFinder.top_input_directions."""
        return self.range_finder.top_input_directions(r, exclude)

    def record(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Backward-time hook: sketch (while capturing), range finder (while armed), gain probe (while recording).

        Args:
            x: [..., d_in] the layer input as the branch used it.
            dy: [..., d_out] gradient of the layer output.
        """
        if x.dtype == torch.float64:
            # The sketch kernels take float32 and lower; their output is float32 anyway.
            x, dy = x.float(), dy.float()
        if self.capturing and self.buffer.device != x.device:
            if self.on_new_device is None:
                raise ValueError(
                    f"the sketch buffer is on {self.buffer.device} but the layer ran on {x.device}; "
                    "give the handle an on_new_device callback or a buffer on the model's device"
                )
            self.on_new_device(x.device)
        # A backward run inside an autocast region (loss.backward() under `with autocast`) must
        # not recast the sketch's own matmuls: the backends pick their dtypes themselves.
        with torch.autocast(x.device.type, enabled=False):
            if self.capturing:
                self.sketch(x, dy, out=self.out, backend=self.backend)
            if self.range_finder.armed:
                self.range_finder.accumulate(x, dy)
            if self.gain_probe.recording:
                self.gain_probe.accumulate(x, dy)


def _compute_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """dtype of the branch matmuls: autocast's when it is on (as nn.Linear would run), else the
    adapter's (PEFT casts the input to the adapter dtype)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and lora_A.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return lora_A.dtype


class LoRACaptureFunction(torch.autograd.Function):
    """y_lora = scaling * (x A^T) B^T; backward also records (x, dY) in the CaptureHandle.

    Autocast is handled explicitly instead of with torch.amp.custom_fwd/custom_bwd, whose
    device_type is fixed when the class is defined: forward casts x, A and B to the dtype
    autocast would use (see _compute_dtype) and saves those casts, and backward runs on them,
    so it computes the same thing on every device and whatever autocast state backward runs in.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, anchor, args):
        """
        Args:
            x: [..., d_in].
            lora_A: [r, d_in]; lora_B: [d_out, r] (r may be 0).
            anchor: None or a tensor requiring grad, so backward runs even if nothing else needs it.
            args: (scaling, handle).
        Returns:
            [..., d_out] in the compute dtype.
        """
        scaling, handle = args
        dtype = _compute_dtype(x, lora_A)
        x_c = x.to(dtype)
        a_c, b_c = lora_A.to(dtype), lora_B.to(dtype)
        h = x_c @ a_c.T  # [..., r]
        y = (h @ b_c.T).mul_(scaling)  # [..., d_out]
        # x_c is the input dA needs anyway, and the sketch reuses it: no extra activation.
        ctx.save_for_backward(x_c, h, a_c, b_c)
        ctx.args = args
        ctx.dtypes = (x.dtype, lora_A.dtype, lora_B.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_c, h, a_c, b_c = ctx.saved_tensors
        scaling, handle = ctx.args
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        dy = dy.to(x_c.dtype)
        r = a_c.shape[0]
        dx = d_a = d_b = None
        handle.record(x_c, dy)
        if r == 0:
            # A rank-0 branch is constant zero: no gradient flows (None reads as zero).
            return dx, d_a, d_b, None, None
        # The scaling goes onto the small products, never onto a full [N, d_out] copy of dY.
        g = dy.reshape(-1, dy.shape[-1])  # [N, d_out]
        if ctx.needs_input_grad[2]:
            d_b = (g.T @ h.reshape(-1, r)).mul_(scaling).to(b_dtype)  # [d_out, r]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dh = (g @ b_c).mul_(scaling)  # [N, r]
            if ctx.needs_input_grad[1]:
                d_a = (dh.T @ x_c.reshape(-1, x_c.shape[-1])).to(a_dtype)  # [r, d_in]
            if ctx.needs_input_grad[0]:
                dx = (dh @ a_c).reshape(x_c.shape).to(x_dtype)  # [..., d_in]
        return dx, d_a, d_b, None, None


def lora_capture(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    handle: CaptureHandle,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional form of LoRACaptureFunction: scaling * (x A^T) B^T, capturing in backward.

    Args:
        x: [..., d_in] layer input.
        lora_A: [r, d_in]. lora_B: [d_out, r].
        scaling: constant LoRA scaling.
        handle: CaptureHandle; `handle.out` and the range finder are read at backward time.
        anchor: optional tensor requiring grad (any shape, e.g. zero-size): makes backward run
            for a rank-0 or frozen adapter whose input does not require grad.
    Returns:
        [..., d_out] LoRA branch (in the autocast dtype under autocast, else the adapter dtype).
    """
    return LoRACaptureFunction.apply(x, lora_A, lora_B, anchor, (scaling, handle))
