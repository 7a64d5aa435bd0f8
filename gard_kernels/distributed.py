"""Data-parallel GARD: the sketch window of the global gradient, and DDP across resizes.

A sketch is linear in the gradient, so the sketch of the gradient DDP applies (the mean of the
processes' gradients) is the mean of the processes' sketches. Each process keeps capturing its
own sketches into its own ring every step, with no communication; only when a re-allocation is
due is the window (L x M x k floats) all-reduced, once, over the default torch.distributed
process group. Every process then computes the same spectra and the same ranks from the same
numbers, and resizes its adapters identically.

DDP's reducer registers gradient hooks and buckets for the parameter shapes it saw when it was
built; a resize replaces the factors' storage, so the wrapper must be rebuilt after every
re-allocation (`rebuild_ddp`).

Also here, for every engine: the check that all processes build GARD with the same config
(`check_same_config`, at construction), the refusal of what GARD cannot adapt (DDP / FSDP1
wrappers, DeepSpeed ZeRO-3 partitions), and process-0-only writing (`on_rank_zero`). FSDP2
(`fully_shard`) has its own module, fsdp.py. See docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "check_same_config", "is_distributed", "mean_over_processes", "on_rank_zero", "reduce_gain_probes", "reduce_range_finders",
    "reduce_window",
    "reject_partitioned", "reject_wrapped", "rebuild_ddp", "wrap_ddp",
]

_Result = TypeVar("_Result")

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
    mean, valid = mean_over_processes(sketches, valid, group)
    return torch.where(valid[..., None], mean, 0.0), valid


def mean_over_processes(
    sketches: torch.Tensor, valid: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The processes' mean of `sketches` [..., k] and the AND of `valid` [...], in one all-reduce.

    Unlike `reduce_window`, invalid entries keep their mean (the ring's open slot is invalid
    until it closes, and a checkpoint keeps what it holds). New tensors, or the inputs themselves
    when not distributed.
    """
    if not is_distributed(group):
        return sketches, valid
    # The invalid flag rides along as an extra column, so validity costs no second collective;
    # summed, it counts the processes that rejected the slot (small ints, exact in float32).
    packed = torch.cat([sketches, (~valid).to(sketches.dtype)[..., None]], dim=-1)  # [..., k + 1]
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[..., :-1] / dist.get_world_size(group), packed[..., -1] == 0


def mean_of_scalar(value: float, device: torch.device, group: Optional[dist.ProcessGroup] = None) -> float:
    """The processes' mean of one number (`value` itself when not distributed); every process
    gets the same float, so decisions taken from it agree."""
    if not is_distributed(group):
        return value
    packed = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return float(packed[0]) / dist.get_world_size(group)


def check_same_config(config: dict[str, Any], group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise on every process if `config` (GARDConfig.to_dict()) differs between the processes.

    One all-gather of a 63-bit hash; only on a mismatch a second one gathers the configs, to
    name the fields that differ. A different seed alone matters: the processes' sketches would
    use unrelated projections, and their mean would be the sketch of no gradient.
    """
    if not is_distributed(group):
        return
    text = json.dumps(config, sort_keys=True, default=repr)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
    device = _collective_device(group)
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if len({int(t.item()) for t in gathered}) == 1:
        return
    configs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    differ = []
    for key in sorted(set().union(*configs)):
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            differ.append(f"{key}: " + ", ".join(f"process {i} has {v!r}" for i, v in enumerate(values)))
    raise ValueError(
        "GARDConfig differs between the processes (" + "; ".join(differ) + "): every process must build GARD "
        "with the same config and seed, or their sketches, allocations and adapters do not agree"
    )


def on_rank_zero(fn: Callable[[], _Result], group: Optional[dist.ProcessGroup] = None) -> Optional[_Result]:
    """Run `fn` on process 0 only and share its outcome: every process returns or raises together.

    Returns fn()'s result on process 0 and None on the others (or fn()'s result when not
    distributed). An exception on process 0 is raised on every process (as a RuntimeError there).
    """
    if not is_distributed(group):
        return fn()
    result, error = None, None
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except Exception as exc:  # shared below, then raised
            error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"process 0 failed: {outcome[0]}")
    return result


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """A device the group's backend can reduce on: the CPU unless the backend is NCCL-only."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
    _mean_in_place([t for f in armed for t in f.sums], device, group)
    tokens = torch.tensor([f.tokens for f in armed], dtype=torch.int64, device=device)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM, group=group)
    for f, count in zip(armed, tokens.tolist()):
        f.tokens = count


def _mean_in_place(tensors: Sequence[torch.Tensor], device: torch.device, group: Optional[dist.ProcessGroup]) -> None:
    """Replace each tensor by its mean over the processes: one all-reduce of one flat float32 copy."""
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


# The most floats one all-reduce of reduce_gain_probes carries (256 MiB of float32): the probes'
# last pass holds 2 x d_out x 2p floats per layer, gigabytes on a large all-linear model, and one
# flat copy of them all would double that on the device for the moment of the collective.
_GAIN_BUCKET_FLOATS = 1 << 26


def reduce_gain_probes(probes: Sequence[Any], device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
    """Average the recording gain probes' current pass (score="marginal_gain") over the processes, in place.

    Each pass's sums (G_h Omega, G_h^T B_h, G_h [Q_0, Q_1] per half h) are linear in G, every
    process drew the same Omega (same seed) and, from the mean, derives the same bases for the next
    pass: called before each next_pass() and before gains(), the probes are those of the mean
    gradient (DDP's), as one process that sees every process's batches with the mean loss. The
    `finite` flags of the earlier passes are AND-ed in the same collective; a non-finite sum on
    any process is non-finite in the mean, so every process refuses (or not) together. Token
    counts are not reduced: gains() divides by the batches of each half, the same everywhere.
    One all-reduce per pass, split in pieces of at most 256 MiB. A no-op when not distributed.

    Args:
        probes: GainProbes (lora/gain_probe.py); only recording ones take part (the same on every process).
        device: where the collective runs (the ring's device: CUDA for NCCL).
        group: process group; default None.
    """
    recording = [p for p in probes if p.recording]
    if not recording or not is_distributed(group):
        return
    # Per probe and half, 1 where an earlier pass was non-finite; summed, the processes that saw one.
    flags = torch.tensor([float(not ok) for p in recording for ok in p.finite], device=device)
    pieces, piece, size = [], [flags], flags.numel()
    for probe in recording:
        sums = probe.sums
        if size + sums.numel() > _GAIN_BUCKET_FLOATS and piece:
            pieces.append(piece)
            piece, size = [], 0
        piece.append(sums)
        size += sums.numel()
    pieces.append(piece)
    for piece in pieces:
        _mean_in_place(piece, device, group)
    flags = (flags == 0).view(len(recording), 2).tolist()
    for probe, finite in zip(recording, flags):
        probe.finite = finite


def reject_wrapped(model: nn.Module) -> None:
    """Raise if `model` is a DDP / DataParallel wrapper (GARD must change the inner module first)
    or holds FSDP1 wrappers (their flat parameters hide the layers GARD adapts)."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise TypeError(
            "GARD got a model with FSDP1 (FullyShardedDataParallel) wrappers, whose flat parameters GARD "
            "cannot adapt: shard it with FSDP2 instead (torch.distributed.fsdp.fully_shard, or Accelerate with "
            "fsdp_version: 2) and build GARD afterwards; see docs/distributed.md"
        )
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"GARD got a {type(model).__name__} wrapper. Wrap the plain model with GARD first and with DDP "
            "afterwards (gard_kernels.distributed.wrap_ddp); if DDP already exists, pass ddp_model.module "
            "and then replace the wrapper: ddp_model = gard_kernels.distributed.rebuild_ddp(ddp_model)"
        )


def reject_partitioned(targets: Sequence[Any]) -> None:
    """Raise if a target module's weight is partitioned by DeepSpeed ZeRO-3 (ds_id, or shape [0]).

    Args:
        targets: manager.Target entries (name, module), checked before any shape is read.
    """
    for target in targets:
        weight = getattr(target.module, "weight", None)
        if weight is None:
            continue
        if hasattr(weight, "ds_id") or weight.numel() == 0:
            raise ValueError(
                f"the weight of {target.name!r} is partitioned (shape {tuple(weight.shape)}"
                f"{', DeepSpeed ds_id ' + str(weight.ds_id) if hasattr(weight, 'ds_id') else ''}): DeepSpeed ZeRO-3 "
                "is not supported yet (GARD reads each target layer's weight and resizes adapters, which ZeRO's "
                "partitioned buffers cannot follow); shard with FSDP2 (torch.distributed.fsdp.fully_shard) or use "
                "DDP, see docs/distributed.md"
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


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


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
