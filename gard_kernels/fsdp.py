"""GARD on a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): adapters outside FSDP.

Design. The LoRA factors are ordinary tensors, replicated on every process, that FSDP2 does not
manage: GARD is built after `fully_shard` (it then wraps the sharded base layers; FSDP2 gathers
their weights before each block's forward as usual), or before it with the factors passed as
`fully_shard(..., ignored_params=set(gard.lora_parameters()))`. Nobody else reduces their
gradients, so GARD does it: one all-reduce (mean over the processes, as FSDP2 averages) of
every factor's gradient, in a step pre-hook of the attached optimizer, i.e. once per optimizer
step whatever the gradient accumulation. Every process then applies the same update to the same
factors, and allocations (the reduced sketch window, distributed.py) are the same everywhere,
so resizes stay local and identical: static and dynamic mode both work.

Why not shard the factors as DTensors: FSDP2 fixes a parameter's shape when `fully_shard` runs
(padded shard, all-gather sizes, a new Parameter object), while GARD changes adapter shapes at
every allocation; sharded factors would have to be re-sharded, and the optimizer rebuilt, after
each one. The factors are small (the budget: typically 0.1-1% of the model's parameters), so
replicating them costs little memory, and the all-reduce moves at most `budget` floats per step.
Factors that FSDP2 did shard (GARD built before `fully_shard` without `ignored_params`) are
refused with a message that says what to do (`check_adapters_outside_fsdp`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .distributed import is_distributed

__all__ = [
    "LoRAGradientSync", "average_lora_gradients", "check_adapters_outside_fsdp", "check_replicated",
    "fully_shard_available", "is_fully_sharded",
]


def fully_shard_available() -> bool:
    """Whether this torch has FSDP2 (`torch.distributed.fsdp.fully_shard`, torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` or to any of its submodules."""
    if not fully_shard_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def average_lora_gradients(gard) -> None:
    """Average the LoRA factors' gradients over the processes now, e.g. before clipping them.

    Under FSDP2 the attached optimizer's step does it otherwise; after this call it does not
    average the same gradients again. A no-op on one process and under DDP.

    Args:
        gard: the GARD controller (every process calls this together).
    """
    gard._gradient_sync.reduce()


def check_adapters_outside_fsdp(layers: Sequence[nn.Module]) -> None:
    """Raise if FSDP2 manages (shards) any LoRA factor of `layers` (LoRALayers).

    Raises:
        RuntimeError: GARD was built before `fully_shard` without ignoring its factors.
    """
    sharded = [layer.name for layer in layers if _is_dtensor(layer.lora_A) or _is_dtensor(layer.lora_B)]
    if sharded:
        raise RuntimeError(
            f"fully_shard sharded GARD's LoRA factors ({len(sharded)} adapted modules, e.g. {sharded[0]!r}): "
            "FSDP2 fixes a parameter's shape when it shards it, and GARD changes adapter shapes. Build GARD "
            "after fully_shard, or pass ignored_params=set(gard.lora_parameters()) to every fully_shard call "
            "(with the Hugging Face Trainer / Accelerate: apply fully_shard to the model yourself before "
            "Trainer(...), which then leaves it as it is); see docs/distributed.md"
        )


class LoRAGradientSync:
    """Averages the LoRA factors' gradients over the processes when the model is FSDP2-sharded.

    `before_optimizer_step()` runs in the attached optimizer's step pre-hook
    (controller.GARD.attach_optimizer); `reduce()` may run earlier in the step (before clipping).
    It does nothing on one process, and under DDP (whose wrapper already reduces the factors:
    the model given to GARD is then never `fully_shard`-ed).

    Args:
        model: the model GARD wraps.
        parameters: returns every LoRA factor, in the same order on every process.
        group: process group; default None (the default group).
    """

    def __init__(self, model: nn.Module, parameters: Callable[[], list[nn.Parameter]], group=None):
        self.model = model
        self.parameters = parameters
        self.group = group
        # Once sharded, a model stays sharded: the module scan runs only until the first hit.
        self._sharded = False
        # The gradients of this optimizer step are averaged already (reduce() ran before the step).
        self._reduced = False

    def needed(self) -> bool:
        """Whether nobody but GARD reduces the factors' gradients (FSDP2, more than one process)."""
        if not is_distributed(self.group):
            return False
        if not self._sharded and is_fully_sharded(self.model):
            _check_mesh_spans_group(self.model, self.group)
            self._sharded = True
        return self._sharded

    def before_optimizer_step(self) -> None:
        """Average this step's gradients unless reduce() already did; the next step's are new."""
        self.reduce()
        self._reduced = False

    @torch.no_grad()
    def reduce(self) -> None:
        """All-reduce every factor's gradient to its mean over the processes, in place, once per step.

        A factor without a gradient on some process counts as a zero gradient there (as FSDP2
        does); a factor without a gradient on every process keeps `grad = None`. One collective
        of sum(numel) + (number of factors) floats.
        """
        if self._reduced or not self.needed():
            return
        self._reduced = True
        params = self.parameters()
        if not params:
            return
        device, dtype = params[0].device, torch.promote_types(torch.float32, params[0].dtype)
        present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
        grads = [p.grad.reshape(-1).to(dtype) if p.grad is not None else p.new_zeros(p.numel(), dtype=dtype) for p in params]
        # The presence flags ride in the same all-reduce: summed, they count the processes that had a grad.
        packed = torch.cat(grads + [present])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        world = dist.get_world_size(self.group)
        counts = packed[-len(params):]
        offset = 0
        for param, count in zip(params, counts.tolist()):
            mean = packed[offset : offset + param.numel()].view_as(param) / world
            offset += param.numel()
            if count == 0:
                continue
            if param.grad is None:
                param.grad = mean.to(param.dtype)
            else:
                param.grad.copy_(mean)


def _check_mesh_spans_group(model: nn.Module, group) -> None:
    """GARD averages over the whole process group: refuse a shard mesh that covers only part of it."""
    world = dist.get_world_size(group)
    for param in model.parameters():
        if _is_dtensor(param):
            size = param.device_mesh.size()
            if size != world:
                raise ValueError(
                    f"the model is sharded over a device mesh of {size} processes but the process group has "
                    f"{world}: GARD averages its adapters' gradients and sketches over the whole group, which "
                    "is right for data parallelism (FSDP2, HSDP) only; tensor / pipeline parallel meshes are "
                    "not supported"
                )
            return


_REPLICATION_ADVICE = (
    "Under FSDP2 attach the optimizer (gard.attach_optimizer) before the first step, so that GARD "
    "averages them; under DDP build the wrapper with gard_kernels.distributed.wrap_ddp and rebuild it "
    "after every re-allocation"
)


def check_replicated(
    values: torch.Tensor, what: str, group: Optional[dist.ProcessGroup] = None, advice: str = _REPLICATION_ADVICE
) -> None:
    """Raise unless `values` is bit-identical on every process (one all-reduce of 2 x numel floats).

    Args:
        values: 1-D tensor, the same shape on every process.
        what: what the values are, for the message.
        advice: what to change, for the message.
    """
    if not is_distributed(group) or values.numel() == 0:
        return
    # max(x) and max(-x) = -min(x) in one collective: equal on every process iff max == min.
    packed = torch.cat([values, -values]).to(torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    high, low = packed[: values.numel()], -packed[values.numel():]
    differs = (high != low) & ~(torch.isnan(high) & torch.isnan(low))
    if bool(differs.any()):
        raise RuntimeError(
            f"{what} differ between processes (by up to {float((high - low)[differs].abs().max()):.3g}): their "
            f"gradients were not reduced. {advice}"
        )
