"""LoRALayer: a frozen Linear / Conv1D plus a low-rank update whose rank can change in training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .base_layers import is_conv1d, adapter_shape, lora_added_in_output_dtype
from .capture import CaptureHandle, lora_capture
from .optim_state import (
    check_remappable,
    mark_new_directions,
    remap_along,
    remap_optimizer_state,
    rescale_optimizer_state,
    reset_optimizer_state,
    track_new_directions,
)
from .range_finder import positive_largest_entry

__all__ = ["GROW_INITS", "LoRALayer", "ResizeRecord", "adapter_shape", "learning_rate"]

GROW_INITS = ("zero", "gradient", "gora")

# Expected norm of a row of the PEFT init: uniform(-b, b) over d_in entries, b = 1/sqrt(d_in),
# has E||a||^2 = d_in b^2 / 3 = 1/3 whatever d_in; gradient-initialised rows get the same norm.
_INIT_ROW_NORM = 1.0 / math.sqrt(3.0)


@dataclass(frozen=True)
class ResizeRecord:
    """What one `LoRALayer.resize` did.

    Attributes:
        name: the layer's name.
        old_rank, new_rank: ranks before and after.
        kept: old directions kept, in their new positions (all of them on a grow), or "svd" when
            the update was re-factored.
        init: "zero" / "gradient" / "gora" on a grow, None otherwise.
        discarded_norm: ||Delta W_old - Delta W_new||_F (0 on a grow: the output is unchanged).
    """

    name: str
    old_rank: int
    new_rank: int
    kept: tuple[int, ...] | str
    init: str | None
    discarded_norm: float


class LoRALayer(nn.Module):
    """Frozen base layer plus Delta W = scaling * B A with a resizable rank.

    y = base(x) + scaling * (x A^T) B^T. A: [r, d_in] and B: [d_out, r] as in PEFT; A starts
    with PEFT's kaiming-uniform(a=sqrt(5)) init, B with zeros, so a new layer computes base(x).

    `scaling` is a constant, independent of the rank, unless `rank_scaling` (a function of the
    rank, lora/scaling.py) is set: a resize then moves `scaling` to rank_scaling(new rank) and
    rescales B (and B's optimizer state) so that the output is unchanged by the new scale. On
    export to PEFT, set per layer lora_alpha = scaling * r (so PEFT's lora_alpha / r equals
    `scaling`), e.g. through rank_pattern / alpha_pattern.

    The adapter lives on the base weight's device, in its dtype when that is float32 / float64
    and in float32 otherwise (PEFT's default for bf16 / fp16 bases).

    Capture: while `capture` is a CaptureHandle whose `out` is set (and grad is enabled), the
    branch runs through LoRACaptureFunction, which sketches the layer's weight gradient dY^T X
    in backward; otherwise the branch is plain torch ops.

    Args:
        base: nn.Linear (weight [d_out, d_in]; bitsandbytes Linear4bit / Linear8bitLt included,
            see base_layers.py) or transformers Conv1D (weight [d_in, d_out]). Its weight and
            bias are frozen.
        rank: initial rank r >= 0 (0: the layer adds nothing and has zero-size factors).
        scaling: constant multiplier of B A (default 1.0).
        name: the module's name in the model, for records and messages.
    """

    def __init__(self, base: nn.Module, rank: int, scaling: float = 1.0, name: str = ""):
        super().__init__()
        d_in, d_out = adapter_shape(base)
        _check_rank(rank)
        self.base = base
        self.d_in, self.d_out = d_in, d_out
        self.rank = rank
        self.scaling = float(scaling)
        self.rank_scaling: Callable[[int], float] | None = None
        self.name = name
        self.capture: CaptureHandle | None = None
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(_init_rows(rank, d_in, None, weight.device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=weight.device, dtype=dtype))
        self._cast_lora_first = lora_added_in_output_dtype(base)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
            f"scaling={self.scaling}"
        )

    @property
    def capturing(self) -> bool:
        """Whether the next forward (with grad enabled) goes through the capture Function: a sketch,
        the range finder or the gain probe waits for its backward pass."""
        return self.capture is not None and self.capture.active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + scaling * (x A^T) B^T.

        Args:
            x: [..., d_in].
        Returns:
            [..., d_out] in base's output dtype.
        """
        y = self.base(x)
        if self.capturing and torch.is_grad_enabled():
            # The anchor requires grad, so backward (and the sketch) runs even for a rank-0 or
            # frozen adapter whose input does not require grad. It is zero-size and not a Parameter.
            anchor = torch.empty(0, device=x.device, requires_grad=True)
            lora = lora_capture(x, self.lora_A, self.lora_B, self.scaling, self.capture, anchor)
            return self._add(y, lora)
        if self.rank == 0:
            return y
        lora = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self._add(y, lora * self.scaling)

    def _add(self, y: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        # As PEFT adds it (base_layers.lora_added_in_output_dtype), so that a PEFT reload of the
        # export computes the same logits on bf16 / fp16 and quantised bases.
        if self._cast_lora_first:
            return y + lora.to(y.dtype)
        return (y + lora).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, [d_out, d_in] (Linear layout; transpose it for a Conv1D base)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def load_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Install saved factors of any rank r (A: [r, d_in], B: [d_out, r]); draws no random numbers.

        The parameters keep their identity; their grads are dropped. Optimizer state is not
        touched: load it afterwards (Optimizer.load_state_dict), as with any checkpoint.
        """
        rank = lora_A.shape[0]
        if lora_A.shape != (rank, self.d_in) or lora_B.shape != (self.d_out, rank):
            raise ValueError(
                f"{self.name or 'layer'}: factors of shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)} do not "
                f"fit d_in={self.d_in}, d_out={self.d_out}; expected [r, {self.d_in}] and [{self.d_out}, r]"
            )
        for param, value in ((self.lora_A, lora_A), (self.lora_B, lora_B)):
            param.grad = None
            _set_data(param, value.detach().to(device=param.device, dtype=param.dtype).clone().contiguous())
        self.rank = rank
        self.scaling = self.scale_at(rank)

    def scale_at(self, rank: int) -> float:
        """The scale this layer has at rank `rank`: rank_scaling(rank), or the constant `scaling`."""
        return self.scaling if self.rank_scaling is None else float(self.rank_scaling(rank))

    @torch.no_grad()
    def set_scaling(self, scaling: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Change the scale without changing the output: B <- B * old / new, and B's gradient and
        optimizer state as the gradient of the rescaled B would be (optim_state.rescale_optimizer_state)."""
        scaling = float(scaling)
        if scaling == self.scaling:
            return
        factor = self.scaling / scaling
        rescale_optimizer_state(optimizer, self.lora_B, factor)
        self.lora_B.data.mul_(factor)
        if self.lora_B.grad is not None:
            self.lora_B.grad.div_(factor)
        self.scaling = scaling

    def snapshot(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Copies of what a resize changes: the factors, their grads and their optimizer state."""

        def copy_state(param):
            if optimizer is None or param not in optimizer.state:
                return None
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[param].items()}

        params = (self.lora_A, self.lora_B)
        return {
            "factors": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else p.grad.clone() for p in params],
            "state": [copy_state(p) for p in params],
            "scaling": self.scaling,
        }

    @torch.no_grad()
    def restore(self, snapshot: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Undo whatever happened since `snapshot(optimizer)`: factors, grads, optimizer state."""
        self.load_factors(*snapshot["factors"])
        self.scaling = snapshot["scaling"]
        for param, grad, state in zip((self.lora_A, self.lora_B), snapshot["grads"], snapshot["state"]):
            param.grad = grad
            if optimizer is not None:
                optimizer.state.pop(param, None)
                if state is not None:
                    optimizer.state[param] = state
        if optimizer is not None:
            # The restored state may hold grown directions' ages again (or no longer).
            track_new_directions(optimizer)

    @torch.no_grad()
    def resize(
        self,
        new_rank: int,
        grow_init: str = "zero",
        shrink: str = "norm",
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator | None = None,
    ) -> ResizeRecord:
        """Change the rank in place; lora_A / lora_B keep their identity (only `.data` changes).

        Grow: r_new - r directions are appended. Their A rows are PEFT-style random
        (grow_init="zero") or (grow_init="gradient" / "gora") the top right singular vectors of
        the weight gradient G = dY^T X restricted to the complement of the current A rows, from
        the capture handle's armed range finder, each with the norm a random row has on average.
        Their B columns are zero, so the output is unchanged ("zero", "gradient"), or (GoRA's
        initialisation, He et al. 2025, for the new directions only) B_new = -(xi / scaling)
        G A_new^T (A_new A_new^T)^-1 with xi = lr sqrt(d_in / r_new), so that the new product
        scaling B_new A_new is one gradient step of G projected onto the new rows; lr is the
        optimizer's base learning rate for lora_B (a scheduler's initial_lr, else lr).
        Shrink: "norm" keeps the r_new directions with the largest ||a_i|| ||b_i||, unchanged and
        in their old order; "svd" re-factors Delta W into its best rank-r_new approximation,
        B' = Q_b U S^1/2, A' = S^1/2 V^T Q_a^T from B = Q_b R_b, A^T = Q_a R_a and the SVD
        R_b R_a^T = U S V^T.

        Optimizer state follows (optim_state.py): sliced / zero-padded along the rank dimension,
        with grown elements run as a fresh Adam of their own (their first update is never ~3x lr);
        dropped for both factors after an "svd" shrink and at rank 0 (so
        resize(0) then resize(r) starts the optimizer afresh). An existing .grad is sliced / padded the
        same way (dropped after "svd"); resize between steps, after zero_grad, to avoid both.

        Args:
            new_rank: target rank >= 0.
            grow_init: "zero", "gradient" or "gora" (both need `capture` armed with p >=
                new_rank - rank and at least one backward pass since; "gora" an optimizer).
            shrink: "norm" or "svd".
            optimizer: optimizer holding lora_A / lora_B, or None.
            generator: torch.Generator for random A rows (on the generator's device).
        Returns:
            ResizeRecord.
        Raises:
            TypeError: optimizer state that cannot follow (checked before anything changes).
        """
        _check_rank(new_rank)
        if grow_init not in GROW_INITS:
            raise ValueError(f"grow_init must be one of {GROW_INITS}, got {grow_init!r}")
        if grow_init == "gora" and new_rank > self.rank and optimizer is None:
            raise ValueError("grow_init='gora' takes one gradient step of the optimizer's lr: pass the optimizer")
        if shrink not in ("norm", "svd"):
            raise ValueError(f"shrink must be 'norm' or 'svd', got {shrink!r}")
        old_rank = self.rank
        check_remappable(optimizer, (self.lora_A, self.lora_B))
        if new_rank == old_rank:
            return ResizeRecord(self.name, old_rank, new_rank, tuple(range(old_rank)), None, 0.0)
        # The new rank's scale first, output unchanged; the resize then works at that scale.
        self.set_scaling(self.scale_at(new_rank), optimizer)
        if new_rank > old_rank:
            return self._grow(new_rank, grow_init, optimizer, generator)
        if shrink == "norm":
            return self._shrink_norm(new_rank, optimizer)
        return self._shrink_svd(new_rank, optimizer, generator)

    def _grow(self, new_rank, grow_init, optimizer, generator) -> ResizeRecord:
        a, b = self.lora_A, self.lora_B
        old_rank = self.rank
        n_new = new_rank - old_rank
        cols = b.new_zeros(self.d_out, n_new)
        if grow_init in ("gradient", "gora"):
            if self.capture is None:
                raise RuntimeError(f"{self.name or 'layer'}: grow_init={grow_init!r} needs a capture handle")
            if self.capture.armed and self.capture.range_tokens == 0:
                # No gradient reached the layer (unused in forward): nothing to align with.
                directions = a.data.new_zeros(0, self.d_in)
                g_dirs = b.data.new_zeros(self.d_out, 0)
            else:
                directions, g_dirs = self.capture.range_finder.top_input_directions(
                    n_new, exclude=a.data, with_gradient=True
                )
            rows = directions * _INIT_ROW_NORM
            if grow_init == "gora" and directions.shape[0]:
                # A_new = c V (orthonormal V): (A A^T)^-1 = I / c^2 and G A^T = c G V^T.
                xi = learning_rate(optimizer, b) * math.sqrt(self.d_in / new_rank)
                gora = -(xi / (self.scaling * _INIT_ROW_NORM)) * g_dirs
                cols[:, : gora.shape[1]] = gora.to(device=cols.device, dtype=cols.dtype)
            if rows.shape[0] < n_new:
                # The complement of the kept rows inside the captured subspace ran out.
                fresh = _init_rows(n_new - rows.shape[0], self.d_in, generator, a.device, a.dtype)
                rows = torch.cat([rows.to(device=a.device, dtype=a.dtype), fresh])
        else:
            rows = _init_rows(n_new, self.d_in, generator, a.device, a.dtype)
        self._assign(
            torch.cat([a.data, rows.to(device=a.device, dtype=a.dtype)]),
            torch.cat([b.data, cols], dim=1),
            optimizer,
            torch.arange(old_rank, device=a.device),
        )
        return ResizeRecord(self.name, old_rank, new_rank, tuple(range(old_rank)), grow_init, 0.0)

    def _shrink_norm(self, new_rank, optimizer) -> ResizeRecord:
        a, b = self.lora_A.data, self.lora_B.data
        strength = a.norm(dim=1) * b.norm(dim=0)  # [r]
        keep = torch.topk(strength, new_rank, sorted=False).indices.sort().values
        dropped = torch.ones(self.rank, dtype=torch.bool, device=a.device)
        dropped[keep] = False
        discarded = self.scaling * _product_norm(b[:, dropped], a[dropped])
        old_rank = self.rank
        self._assign(a[keep], b[:, keep], optimizer, keep)
        return ResizeRecord(self.name, old_rank, new_rank, tuple(keep.tolist()), None, discarded)

    def _shrink_svd(self, new_rank, optimizer, generator) -> ResizeRecord:
        a, b = self.lora_A.data, self.lora_B.data
        q_b, r_b = torch.linalg.qr(b.double())  # [d_out, k_b], [k_b, r]
        q_a, r_a = torch.linalg.qr(a.double().T)  # [d_in, k_a], [k_a, r]
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core [k_b, k_a]
        # Directions with (numerically) zero singular value would get A row = 0 and B column = 0,
        # which no gradient can revive; they start fresh instead (e.g. Delta W = 0 after a grow).
        tol = s.max() * max(self.d_in, self.d_out) * torch.finfo(torch.float32).eps
        k = int((s[:new_rank] > tol).sum())
        root = s[:k].sqrt()
        signs = positive_largest_entry(vh[:k] @ q_a.T)  # one sign per (u, v) pair, on every LAPACK
        new_b = (q_b @ u[:, :k]) * (root * signs)  # [d_out, k]
        new_a = (root * signs)[:, None] * (vh[:k] @ q_a.T)  # [k, d_in]
        discarded = self.scaling * s[k:].square().sum().sqrt().item()
        if k < new_rank:
            fresh = _init_rows(new_rank - k, self.d_in, generator, a.device, torch.float64)
            new_a = torch.cat([new_a, fresh])
            new_b = torch.cat([new_b, new_b.new_zeros(self.d_out, new_rank - k)], dim=1)
        old_rank = self.rank
        self._assign(new_a.to(a.dtype), new_b.to(b.dtype), optimizer, None)
        return ResizeRecord(self.name, old_rank, new_rank, "svd", None, discarded)

    def _assign(self, new_a, new_b, optimizer, index) -> None:
        """Install new factors; state and grads follow `index` (old positions kept), or are dropped."""
        new_rank = new_a.shape[0]
        for param, new, dim in ((self.lora_A, new_a, 0), (self.lora_B, new_b, 1)):
            grad = None
            if index is None or new_rank == 0:
                reset_optimizer_state(optimizer, param)
            else:
                remap_optimizer_state(optimizer, param, index, new_rank, dim)
                if param.grad is not None:
                    grad = remap_along(param.grad, index, new_rank, dim)
            # The old grad must go first: autograd refuses a grad whose shape differs from the data.
            param.grad = None
            _set_data(param, new.contiguous())
            param.grad = grad
            if index is not None and new_rank > index.numel():
                mark_new_directions(optimizer, param, index.numel(), dim)
        self.rank = new_rank


def learning_rate(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    """The base learning rate of the param group that holds `param`.

    An LR scheduler keeps the base rate in "initial_lr": GoRA's step uses it, not a warm-up's
    momentary (possibly zero) rate.
    """
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group.get("initial_lr", group["lr"]))
    raise ValueError("grow_init='gora': the optimizer does not hold this layer's lora_B")


def _check_rank(rank) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"LoRA rank must be a non-negative int, got {rank!r}")


def _set_data(param: nn.Parameter, new: torch.Tensor) -> None:
    """param.data = new, also when the shape changes while an old graph is still alive.

    A leaf caches its gradient accumulator (with the old shape) for as long as some graph holds
    it, e.g. the previous step's `loss`; `.data =` drops that cache only when the dtype or device
    changes, and a backward through the stale accumulator fails on the shape. Passing through a
    zero-size tensor of another dtype drops it.
    """
    other = torch.float64 if new.dtype != torch.float64 else torch.float32
    param.data = new.new_empty(0, dtype=other)
    param.data = new


def _init_rows(n: int, d_in: int, generator, device, dtype) -> torch.Tensor:
    """[n, d_in] rows of PEFT's A init: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    gen_device = generator.device if generator is not None else device
    rows = torch.empty(n, d_in, device=gen_device, dtype=dtype).uniform_(-bound, bound, generator=generator)
    return rows.to(device)


def _product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F without forming it: ||B A||^2 = sum((B^T B) * (A A^T)), O(r^2 (d_in + d_out))."""
    b, a = b.double(), a.double()
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt().item()
