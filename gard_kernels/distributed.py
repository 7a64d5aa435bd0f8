"""Data-parallel GARD: the sketch window of the global gradient, and DDP across resizes.

A sketch is linear in the gradient, so the sketch of the gradient DDP applies (the mean of the
processes' gradients) is the mean of the processes' sketches. Each process keeps capturing its
own sketches into its own ring every step, with no communication; only when a re-allocation is
due is the window (L x M x k floats) all-reduced, once, over the default torch.distributed
process group. Every process then computes the same spectra and the same ranks from the same
numbers, and resizes its adapters identically.

DDP's reducer registers gradient hooks and buckets for the parameter shapes it saw when it was
built; a resize replaces the factors' storage, so the wrapper must be rebuilt after every
re-allocation (`rebuild_ddp`). See docs/distributed.md.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_distributed", "reduce_range_finders", "reduce_window", "reject_wrapped", "rebuild_ddp", "wrap_ddp"]

# DDP attributes that record constructor arguments under the same name (torch 2.x).
_DDP_ATTRIBUTES = ("device_ids", "output_device", "dim", "process_group", "find_unused_parameters",
                   "gradient_as_bucket_view", "static_graph", "mixed_precision")


def is_distributed(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether torch.distributed is initialised with more than one process (in `group`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_window(
    sketches: torch.Tensor, valid: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch window of the global gradient: the processes' sketches averaged, validity AND-ed.

    One all-reduce of L·M·(k+1) floats. The mean, not the sum, because DDP averages gradients:
    the result is the sketch of the gradient the optimizer applies, the same as one process that
    sees every batch and averages their losses (gradient accumulation with loss / steps). A slot
    rejected (non-finite) on any process is invalid everywhere and comes back zeroed.

    Args:
        sketches: [L, M, k] float, the ring's window (not modified).
        valid: [L, M] bool.
        group: process group; default None (the default group).
    Returns:
        (sketches [L, M, k], valid [L, M]): new tensors, or the inputs themselves when not distributed.
    """
    if not is_distributed(group):
        return sketches, valid
    # The invalid flag rides along as an extra column, so validity costs no second collective;
    # summed, it counts the processes that rejected the slot (small ints, exact in float32).
    packed = torch.cat([sketches, (~valid).to(sketches.dtype)[..., None]], dim=-1)  # [L, M, k + 1]
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    valid = packed[..., -1] == 0  # [L, M]
    mean = packed[..., :-1] / dist.get_world_size(group)  # [L, M, k]
    return torch.where(valid[..., None], mean, 0.0), valid


def reduce_range_finders(finders: Sequence[Any], device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
    """Average the armed range finders (grow_init="gradient") over the processes, in place.

    Z = Gᵀ Ω_out and Y = G Ω_in are linear in G and every process drew the same Ω (same seed),
    so the mean is the range finder of the global gradient and every process derives the same
    new directions. Token counts are summed. A no-op when not distributed or nothing is armed.

    Args:
        finders: RangeFinders (lora/range_finder.py); only armed ones take part (the same on every process).
        device: where the collective runs (the ring's device: CUDA for NCCL).
        group: process group; default None.
    """
    armed = [f for f in finders if f.armed]
    if not armed or not is_distributed(group):
        return
    buffers = [t for f in armed for t in f.sums]
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t in buffers:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    tokens = torch.tensor([f.tokens for f in armed], dtype=torch.int64, device=device)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
    for f, count in zip(armed, tokens.tolist()):
        f.tokens = count


def reject_wrapped(model: nn.Module) -> None:
    """Raise if `model` is a DDP / DataParallel wrapper: GARD must change the inner module first."""
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"GARD got a {type(model).__name__} wrapper. Wrap the plain model with GARD first and with DDP "
            "afterwards (gard_kernels.distributed.wrap_ddp); if DDP already exists, pass ddp_model.module "
            "and then replace the wrapper: ddp_model = gard_kernels.distributed.rebuild_ddp(ddp_model)"
        )


def wrap_ddp(module: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """DistributedDataParallel(module, **ddp_kwargs), skipping the empty (rank-0) LoRA factors.

    Zero-size factors carry nothing to synchronise but get no gradient either, which plain DDP
    (find_unused_parameters=False) reports as an error on the next step; they are marked ignored.
    The keyword arguments are recorded so that `rebuild_ddp` can repeat them.

    Args:
        module: the model after GARD wrapped it (every process must call this together).
        ddp_kwargs: DistributedDataParallel keyword arguments (device_ids, ...).
    """
    _ignore_empty_parameters(module)
    ddp = DistributedDataParallel(module, **ddp_kwargs)
    ddp._gard_ddp_kwargs = dict(ddp_kwargs)
    return ddp


def rebuild_ddp(ddp_model: DistributedDataParallel, **overrides: Any) -> DistributedDataParallel:
    """A fresh DDP wrapper around the same module, for the parameter shapes after a resize.

    Call it on every process right after a `gard.step()` that returned a re-allocation record
    (`if gard.step() is not None: ddp = rebuild_ddp(ddp)`), before the next forward. The old
    wrapper's gradient hooks are removed, so it no longer synchronises anything: drop it. The
    new one broadcasts the parameters from rank 0 and checks that every process has the same
    shapes. The optimizer needs nothing: the factors keep their identity through a resize.

    Args:
        ddp_model: the current wrapper.
        overrides: DDP keyword arguments to change. The rest are those given to `wrap_ddp`, or
            for a wrapper built directly read back from it (device_ids, output_device, dim,
            process_group, find_unused_parameters, gradient_as_bucket_view, static_graph,
            mixed_precision, bucket_cap_mb, broadcast_buffers / forward_sync_buffers); pass any
            other argument you built it with again here.
    Returns:
        The new DistributedDataParallel.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"rebuild_ddp expects a DistributedDataParallel, got {type(ddp_model).__name__}")
    kwargs = getattr(ddp_model, "_gard_ddp_kwargs", None)
    if kwargs is None:
        kwargs = _read_ddp_kwargs(ddp_model)
    kwargs = {**kwargs, **overrides}
    reducer = getattr(ddp_model, "reducer", None)
    if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
        # Otherwise, while some reference keeps the old wrapper alive, its hooks on the factors
        # that kept their storage would still fire into stale buckets.
        reducer._remove_autograd_hooks()
    return wrap_ddp(ddp_model.module, **kwargs)


def _read_ddp_kwargs(ddp_model: DistributedDataParallel) -> dict[str, Any]:
    accepted = inspect.signature(type(ddp_model).__init__).parameters
    kwargs = {name: getattr(ddp_model, name) for name in _DDP_ATTRIBUTES if name in accepted and hasattr(ddp_model, name)}
    if "bucket_cap_mb" in accepted and hasattr(ddp_model, "bucket_bytes_cap"):
        kwargs["bucket_cap_mb"] = ddp_model.bucket_bytes_cap / (1024 * 1024)
    if "forward_sync_buffers" in accepted and hasattr(ddp_model, "forward_sync_buffers"):
        kwargs["forward_sync_buffers"] = ddp_model.forward_sync_buffers
    elif "broadcast_buffers" in accepted and hasattr(ddp_model, "broadcast_buffers"):
        kwargs["broadcast_buffers"] = ddp_model.broadcast_buffers
    return kwargs


def _ignore_empty_parameters(module: nn.Module) -> None:
    """Mark zero-size parameters DDP-ignored, keeping what the user marked; unmark grown ones."""
    ours = set(getattr(module, "_gard_ddp_ignored", ()))
    theirs = [n for n in getattr(module, "_ddp_params_and_buffers_to_ignore", ()) if n not in ours]
    params = dict(module.named_parameters())
    empty = [name for name, p in params.items() if p.numel() == 0]
    if not any(p.requires_grad and p.numel() > 0 for name, p in params.items() if name not in theirs):
        # DDP refuses a module with nothing left to synchronise. All factors at rank 0 still get
        # (empty) gradients while capturing; outside the capture windows nothing trains anyway.
        empty = []
    for name, param in params.items():
        if name in ours and name not in empty and name not in theirs and hasattr(param, "_ddp_ignored"):
            del param._ddp_ignored
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, theirs + empty)
    module._gard_ddp_ignored = empty
