"""Gradient capture for LoRA layers: the autograd Function that sketches dY^T X in backward.

The LoRA branch of a layer is added to the base output, so the gradient arriving at the branch
is dY of the whole layer. `LoRACaptureFunction` computes the branch, and in backward feeds the
input it saved for dA anyway, together with that dY, to the layer's `CaptureHandle`: the
GradientSketch (into the ring slot `handle.out`) and, when armed, a randomized range finder
whose output seeds new LoRA directions on a gradient-initialised grow.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..sketch import GradientSketch

__all__ = ["CaptureHandle", "LoRACaptureFunction", "lora_capture"]


class CaptureHandle:
    """Per-layer capture state, shared by the layer and the controller.

    Args:
        sketch: GradientSketch of the layer (d_in, d_out of the layer).
        out: [k_out, k_in] float32 view into the ring buffer's current slot, or None (capture off).
            Set by the controller each step; read at backward time.
        backend: sketch backend, see GradientSketch.__call__.
    """

    def __init__(self, sketch: GradientSketch, out: torch.Tensor | None = None, backend: str = "auto"):
        self.sketch = sketch
        self.out = out
        self.backend = backend
        # Range finder: test matrices Omega_in [d_in, p], Omega_out [d_out, p] and the running
        # Z = G^T Omega_out [d_in, p], Y = G Omega_in [d_out, p]; None while disarmed.
        self._omega_in: torch.Tensor | None = None
        self._omega_out: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self.range_tokens = 0

    def __repr__(self) -> str:
        return (
            f"CaptureHandle({self.sketch!r}, capturing={self.out is not None}, backend={self.backend!r}, "
            f"range_finder={'off' if self._z is None else self._z.shape[1]})"
        )

    @property
    def armed(self) -> bool:
        """Whether backward passes also feed the range finder."""
        return self._z is not None

    def arm_range_finder(self, p: int, generator: torch.Generator | None = None) -> None:
        """Accumulate Z = G^T Omega_out and Y = G Omega_in over the next backward passes.

        G = dY^T X summed over every backward pass until `disarm()`; G itself is never formed.
        Re-arming discards what was accumulated.

        Args:
            p: sketch width; `top_input_directions(r)` needs r <= p (a few extra columns of
                oversampling, p = r + 5 or more, make the estimate accurate).
            generator: torch.Generator for the Gaussian test matrices (on its own device; they
                move to the activations' device on the first backward pass).
        """
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            raise ValueError(f"arm_range_finder: p must be a positive int, got {p!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        d_in, d_out = self.sketch.d_in, self.sketch.d_out
        self._omega_in = torch.randn(d_in, p, generator=generator, device=device)
        self._omega_out = torch.randn(d_out, p, generator=generator, device=device)
        self._z = torch.zeros(d_in, p, device=device)
        self._y = torch.zeros(d_out, p, device=device)
        self.range_tokens = 0

    def disarm(self) -> None:
        """Stop and free the range finder."""
        self._omega_in = self._omega_out = self._z = self._y = None
        self.range_tokens = 0

    def record(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Backward-time hook: sketch (when `out` is set) and range finder (when armed).

        Args:
            x: [..., d_in] the layer input as the branch used it.
            dy: [..., d_out] gradient of the layer output.
        """
        if x.dtype == torch.float64:
            # The sketch kernels take float32 and lower; their output is float32 anyway.
            x, dy = x.float(), dy.float()
        if self.out is not None:
            self.sketch(x, dy, out=self.out, backend=self.backend)
        if self._z is not None:
            self._accumulate_range(x, dy)

    def _accumulate_range(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        if self._z.device != x.device:
            self._omega_in, self._omega_out, self._z, self._y = (
                t.to(x.device) for t in (self._omega_in, self._omega_out, self._z, self._y)
            )
        x2 = x.reshape(-1, self.sketch.d_in).float()  # [N, d_in]
        dy2 = dy.reshape(-1, self.sketch.d_out).float()  # [N, d_out]
        # Z += X^T (dY Omega_out), Y += dY^T (X Omega_in): O(N d p), G never formed.
        self._z.addmm_(x2.T, dy2 @ self._omega_out)
        self._y.addmm_(dy2.T, x2 @ self._omega_in)
        self.range_tokens += x2.shape[0]

    def top_input_directions(self, r: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Estimated top right singular vectors of G (or of G (I - P_exclude)).

        Single-pass randomized SVD (Halko, Martinsson, Tropp 2011, sec. 5.5): Q = orth(Z) spans
        the row space of G; G Q ~ Y (Q^T Omega_in)^+; the SVD of that, rotated back by Q, gives
        the directions. With `exclude`, G is first restricted to the orthogonal complement of the
        rows of `exclude` (the layer's existing A rows), so new directions are complementary.

        Args:
            r: number of directions, 0 <= r <= p.
            exclude: optional [m, d_in] rows whose span the directions must avoid.
        Returns:
            [r', d_in] float32 orthonormal rows on the activations' device, strongest first;
            r' = r unless the complement of `exclude` inside span(Q) has fewer dimensions
            (r' = 0 when a backward pass since arming had non-finite gradients).
        """
        if self._z is None:
            raise RuntimeError(
                "top_input_directions: the range finder is not armed; call arm_range_finder(p) and "
                "run backward passes with capture on before a gradient-initialised grow"
            )
        p = self._z.shape[1]
        if not 0 <= r <= p:
            raise ValueError(f"top_input_directions: r={r} must lie in [0, p={p}]; arm with a larger p")
        if self.range_tokens == 0:
            raise RuntimeError(
                "top_input_directions: no backward pass reached this layer since arm_range_finder; "
                "the gradient is unknown"
            )
        if not (torch.isfinite(self._z).all() and torch.isfinite(self._y).all()):
            # An overflowing or NaN backward pass poisoned the estimate: no direction is known.
            return torch.zeros(0, self.sketch.d_in, device=self._z.device)
        z, y = self._z.double(), self._y.double()
        omega_in = self._omega_in.double()
        q, _ = torch.linalg.qr(z)  # [d_in, p]
        # G Q ~ Y (Q^T Omega_in)^+  (exact when span(Q) holds the row space of G).
        g_q = y @ torch.linalg.pinv(q.T @ omega_in)  # [d_out, p]
        basis = q
        if exclude is not None and exclude.shape[0] > 0:
            e = _orthonormal_rows(exclude.detach().to(device=q.device, dtype=torch.float64))  # [m', d_in]
            # G (I - P) ~ (G Q) ((I - P) Q)^T; write (I - P) Q = U_c S_c V_c^T and keep S_c > 0.
            u_c, s_c, vh_c = torch.linalg.svd(q - e.T @ (e @ q), full_matrices=False)
            keep = s_c > 1e-6
            basis = u_c[:, keep]  # [d_in, k], orthogonal to exclude
            g_q = g_q @ (vh_c[keep].T * s_c[keep])  # [d_out, k]
        _, _, vh = torch.linalg.svd(g_q, full_matrices=False)
        directions = vh[:r] @ basis.T  # [r', d_in]
        return directions.to(torch.float32)


def _orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [k, d] of the row space of m [n, d] (rank-revealing, via SVD)."""
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    return vh[s > s.max() * max(m.shape) * torch.finfo(m.dtype).eps]


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
        g = dy.reshape(-1, dy.shape[-1]) * scaling  # [N, d_out]
        if ctx.needs_input_grad[2]:
            d_b = (g.T @ h.reshape(-1, r)).to(b_dtype)  # [d_out, r]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dh = g @ b_c  # [N, r]
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
