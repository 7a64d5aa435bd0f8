"""GradientSketch: S = P_out^T (dY^T X) P_in without forming the weight gradient; it checks its
inputs and runs one of the backends beside it (dispatch.py picks)."""
from __future__ import annotations

import math

import torch

from .dispatch import ALL_BACKENDS, BACKEND_CHOICES, available_backends, backend_usable, choose_auto
from .dtypes import ACCEPTED_DTYPES
from .hashing import SIDE_IN, SIDE_OUT, projection_matrix, stream_key


class GradientSketch:
    """Random two-sided projection of a linear layer's weight gradient.

    For y = x W^T (W: [d_out, d_in]) and one step's tokens, G = dY^T X and
    S = P_out^T G P_in = (dY P_out)^T (X P_in), a [k_out, k_in] float32 matrix.
    P_in, P_out hold +-1/sqrt(k) from the counter-based hash in hashing.py, keyed by `seed` and
    salted by side, so E<S_i, S_j> = <G_i, G_j> for gradients sketched with one instance.

    Args:
        d_in: input features of the layer.
        d_out: output features of the layer.
        k_in: sketch columns on the input side (default 16).
        k_out: sketch rows on the output side (default 16).
        seed: non-negative int; equal seeds give bit-identical projections on every backend.
    """

    def __init__(self, d_in: int, d_out: int, k_in: int = 16, k_out: int = 16, seed: int = 0):
        for name, value in (("d_in", d_in), ("d_out", d_out), ("k_in", k_in), ("k_out", k_out)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GradientSketch: {name} must be a positive int, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"GradientSketch: seed must be a non-negative int, got {seed!r}")
        self.d_in, self.d_out, self.k_in, self.k_out, self.seed = d_in, d_out, k_in, k_out, seed
        self.key_in = stream_key(seed, SIDE_IN)
        self.key_out = stream_key(seed, SIDE_OUT)
        # Kernels multiply +-1 sums by this once, instead of scaling every projection entry.
        self.scale = 1.0 / math.sqrt(k_in * k_out)
        self._projections: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"GradientSketch(d_in={self.d_in}, d_out={self.d_out}, k_in={self.k_in}, "
            f"k_out={self.k_out}, seed={self.seed})"
        )

    @property
    def p_in(self) -> torch.Tensor:
        """P_in [d_in, k_in] float32 on the CPU (materialised for tests and the reference)."""
        return projection_matrix(self.key_in, self.d_in, self.k_in)

    @property
    def p_out(self) -> torch.Tensor:
        """P_out [d_out, k_out] float32 on the CPU."""
        return projection_matrix(self.key_out, self.d_out, self.k_out)

    def projections(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) materialised on `device`, cached: used by the torch backend only."""
        device = torch.device(device)
        if device not in self._projections:
            self._projections[device] = (
                projection_matrix(self.key_in, self.d_in, self.k_in, device=device),
                projection_matrix(self.key_out, self.d_out, self.k_out, device=device),
            )
        return self._projections[device]

    def __call__(
        self, x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor | None = None, backend: str = "auto"
    ) -> torch.Tensor:
        """Sketch of dY^T X.

        Args:
            x: [..., d_in] float32 / float16 / bfloat16, any strides.
            dy: [..., d_out], same leading dims and device as x.
            out: optional [k_out, k_in] float32 on x's device; the sketch is added into it in place.
            backend: "auto" or one of "reference", "torch", "cpp", "triton", "cuda".
        Returns:
            [k_out, k_in] float32 (`out` itself when given). N = 0 tokens gives zeros (adds nothing).
        """
        x2, dy2 = self._check_inputs(x, dy)
        accumulate = out is not None
        if out is None:
            # Kernels overwrite when not accumulating, so no memset is needed here.
            out = torch.empty(self.k_out, self.k_in, dtype=torch.float32, device=x.device)
        else:
            self._check_out(out, x.device)
        if x2.shape[0] == 0:
            return out if accumulate else out.zero_()
        if backend == "auto":
            backend = choose_auto(x2, dy2, lambda name: self._run(name, x2, dy2, torch.empty_like(out), False))
        elif backend not in ALL_BACKENDS:
            raise ValueError(f"unknown sketch backend {backend!r}; choose one of {BACKEND_CHOICES}")
        elif not backend_usable(backend, x.device.type):
            raise RuntimeError(
                f"sketch backend {backend!r} is not usable for {x.device.type} tensors here; "
                f"usable: {available_backends(x.device)}"
            )
        return self._run(backend, x2, dy2, out, accumulate)

    def _run(
        self, backend: str, x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor, accumulate: bool
    ) -> torch.Tensor:
        """Backend call on 2-D inputs: out (+)= sketch. With accumulate=False out is overwritten."""
        if backend in ("reference", "torch"):
            p_in, p_out = self.projections(x.device)
            if backend == "torch":
                from .torch_impl import sketch_torch

                return sketch_torch(x, dy, p_in, p_out, out, accumulate)
            from .. import reference

            result = reference.sketch(x, dy, p_in, p_out).to(torch.float32)
            return out.add_(result) if accumulate else out.copy_(result)
        args = (x, dy, self.key_in, self.key_out, self.k_in, self.k_out, self.scale, out, accumulate)
        if backend == "triton":
            from .triton_impl import sketch_triton

            return sketch_triton(*args)
        from .native import sketch_native

        return sketch_native(*args)

    def _check_inputs(self, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(dy, torch.Tensor):
            raise TypeError("GradientSketch expects torch.Tensor inputs x and dy")
        if x.dim() < 2 or dy.dim() < 2:
            raise ValueError(
                f"x and dy need a token dimension: got x {tuple(x.shape)}, dy {tuple(dy.shape)}; "
                "pass [N, d] or [batch, seq, d]"
            )
        if x.shape[-1] != self.d_in or dy.shape[-1] != self.d_out:
            raise ValueError(
                f"{self!r} expects x [..., {self.d_in}] and dy [..., {self.d_out}], "
                f"got x {tuple(x.shape)} and dy {tuple(dy.shape)}"
            )
        if x.shape[:-1] != dy.shape[:-1]:
            raise ValueError(
                f"x and dy must share leading (token) dims, got {tuple(x.shape[:-1])} and {tuple(dy.shape[:-1])}"
            )
        if x.device != dy.device:
            raise ValueError(f"x is on {x.device} but dy is on {dy.device}; move both to one device")
        for name, t in (("x", x), ("dy", dy)):
            if t.dtype not in ACCEPTED_DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; the sketch accepts float32, float16 or bfloat16")
        if x.dtype != dy.dtype:
            # Mixed inputs are rare (autocast gives both in one dtype); compute them in float32.
            x, dy = x.float(), dy.float()
        return x.reshape(-1, self.d_in), dy.reshape(-1, self.d_out)

    def _check_out(self, out: torch.Tensor, device: torch.device) -> None:
        if out.shape != (self.k_out, self.k_in) or out.dtype != torch.float32:
            raise ValueError(
                f"out must be float32 [{self.k_out}, {self.k_in}], got {out.dtype} {tuple(out.shape)}"
            )
        if out.device != device:
            raise ValueError(f"out is on {out.device} but the inputs are on {device}")
