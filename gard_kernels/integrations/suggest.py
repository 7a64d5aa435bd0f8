"""suggest_lora_config: GARD's ranks as a plain `peft.LoraConfig`, for training with PEFT alone.

Static GARD (paper §3.3) profiles `window` batches (with the default score, marginal gain, three
forward/backward passes over each), allocates ranks under the budget once, and the allocation is
written in PEFT's vocabulary (per-module r and the lora_alpha that gives GARD's scale(r): scaling
* r, or with the default scaling_rule "rslora" PEFT's use_rslora and scaling * sqrt(r_ref); the
format of `GARD.save_pretrained`). The model is wrapped in place only while profiling: every
module, flag and tensor is put back afterwards, also when profiling fails.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..config import GARDConfig
from ..controller import GARD
from ..lora.peft_format import adapter_config

__all__ = ["suggest_lora_config"]

# GARDConfig fields that only steer dynamic re-allocation or the adapters' start: passing one here
# would be a silent no-op (PEFT initialises the adapters this config describes).
_DYNAMIC_ONLY = ("interval", "ema", "delta_max", "warmup", "freeze_after", "grow_init", "shrink")


def suggest_lora_config(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    budget: int,
    target_modules: Union[Sequence[str], str],
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    task_type: Optional[str] = None,
    progress: bool = False,
    **gard_options: Any,
):
    """A `peft.LoraConfig` whose per-module ranks static GARD chose from `model`'s gradients.

    Runs forward and backward on the first `window` batches (GARDConfig.window, default 4) in
    training mode: three times each with the default score, marginal gain (GARDConfig's static
    default; the batches are kept until it returns), once with a layer score such as
    score="update_nuclear". No optimizer step, no copy of the model; the model is left as it
    was: the same module objects, parameter values, buffers, requires_grad flags, gradients and
    train/eval modes.
    `peft.get_peft_model(model, config)` then has exactly GARD's number of trainable parameters,
    sum r * (d_in + d_out) <= budget.

    Args:
        model: a torch model with nn.Linear (bitsandbytes 4-bit and 8-bit included) or transformers
            Conv1D target modules.
        batches: iterable of model inputs; dicts go to model(**batch) unless loss_fn is given.
        budget: LoRA parameter budget (GARDConfig.budget).
        target_modules: names / suffixes, "all-linear" or a full-match regex (GARDConfig.target_modules).
        loss_fn: loss_fn(model, batch) -> scalar loss; default model(**batch).loss.
        task_type: PEFT task type of the config (e.g. "CAUSAL_LM"), or None.
        progress: show a progress bar of the profiled batches on stderr (only when it is a
            terminal); default off.
        **gard_options: other GARDConfig fields of static GARD: window, min_valid_steps, r_min,
            r_max, r_init, k_in, k_out, alpha, measure, score, scaling, seed, backend.
    Returns:
        peft.LoraConfig with target_modules, rank_pattern and alpha_pattern keyed by full module
        names (use_rslora with scaling_rule="rslora", so PEFT's scale is GARD's scale(r)) (anchored patterns where one name would reach another module; rank-0 modules left
        out), fan_in_fan_out for Conv1D models, lora_dropout 0.
    Raises:
        ValueError: an invalid or dynamic-mode option (a budget below the cheapest module's
            rank-1 cost included), fewer than `window` batches, a batch without a loss, or too
            few batches with a finite loss and gradients (GARDConfig.min_valid_steps).
        TypeError: an option that is not a GARDConfig field, or batches that are not dicts
            without a loss_fn.
    """
    from peft import LoraConfig

    config = _static_config(budget, target_modules, gard_options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    snapshot = _ModelSnapshot(model)
    bar = _progress_bar(config.window) if progress else None
    try:
        gard = GARD(model, config)
        model.train()
        with torch.enable_grad():
            gard.profile(_counted(batches, bar), steps=config.window, loss_fn=_checked_loss(loss_fn))
        if bar is not None:
            bar.update(bar.total - bar.n)
        peft_fields = adapter_config(gard.manager.layers, gard.model, task_type)
    finally:
        if bar is not None:
            bar.close()
        snapshot.restore()
    # The exported adapter is for inference; this config is for training from scratch.
    peft_fields.update(inference_mode=False)
    del peft_fields["peft_type"]
    # Unset fields an older PEFT does not have yet (exclude_modules) are left to its defaults.
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in peft_fields.items() if k in known or v is not None})


def _progress_bar(total: int):
    """A tqdm bar of the profiled batches on stderr, or None where nobody watches (not a terminal),
    as the command line draws its bars."""
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="suggest_lora_config: profiling", unit="batch", file=sys.stderr)


def _counted(batches: Iterable[Any], bar) -> Iterator[Any]:
    """`batches`, ticking `bar` (if any) when the next batch is asked for: the previous one is done."""
    for batch in batches:
        yield batch
        if bar is not None:
            bar.update(1)


def _static_config(budget, target_modules, options: dict[str, Any]) -> GARDConfig:
    mode = options.pop("mode", "static")
    if mode != "static":
        raise ValueError(f"suggest_lora_config allocates once, as static GARD does; drop mode={mode!r}")
    dynamic = sorted(name for name in options if name in _DYNAMIC_ONLY)
    if dynamic:
        raise ValueError(
            f"{dynamic} only steer dynamic re-allocation and have no effect on a one-time allocation; drop them"
        )
    known = {field.name for field in GARDConfig.__dataclass_fields__.values()}
    unknown = sorted(name for name in options if name not in known)
    if unknown:
        raise TypeError(f"unknown GARD option(s) {unknown}; the options are GARDConfig's fields: {sorted(known)}")
    # Only the ranks leave this function; the adapters it profiles with are thrown away, so they
    # start at zero (static GARD's default "gora_safe" would need an optimizer for nothing).
    return GARDConfig(budget=budget, target_modules=target_modules, mode="static", grow_init="zero", **options)


def _checked_loss(loss_fn: Optional[Callable]) -> Callable:
    """loss_fn, or model(**batch).loss, with the errors a user can act on."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if loss_fn is not None:
            value = loss_fn(model, batch)
        elif isinstance(batch, Mapping):
            value = getattr(model(**batch), "loss", None)
            if value is None:
                raise ValueError(
                    "model(**batch) returned no loss; give the batches labels or pass loss_fn(model, batch)"
                )
        else:
            raise TypeError(
                f"a batch is a {type(batch).__name__}, not a dict of model inputs; pass loss_fn(model, batch)"
            )
        if not (torch.is_tensor(value) and value.dim() == 0 and value.requires_grad):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"the loss must be a scalar tensor that requires grad, got {shape}")
        return value

    return loss


class _ModelSnapshot:
    """What GARD's wrapping and a profiling pass can change in a model, to put it back.

    GARD replaces target modules at their parents, freezes every parameter, and the pass runs in
    training mode (which may update buffers, e.g. BatchNorm statistics). Gradients are put back
    as the same tensor objects. Parameter values are never written: there is no optimizer step.
    """

    def __init__(self, model: nn.Module):
        modules = list(model.modules())
        self.children = [(parent, name, child) for parent in modules for name, child in parent._modules.items()]
        self.training = [(module, module.training) for module in modules]
        self.params = [(param, param.requires_grad, param.grad) for param in model.parameters()]
        # Buffers are small next to the weights (rotary tables, norm statistics).
        self.buffers = [
            (module, name, buffer, buffer.detach().clone())
            for module in modules
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]

    def restore(self) -> None:
        for parent, name, child in self.children:
            if parent._modules.get(name) is not child:
                setattr(parent, name, child)
        for module, training in self.training:
            module.training = training
        for param, requires_grad, grad in self.params:
            param.requires_grad_(requires_grad)
            param.grad = grad
        with torch.no_grad():
            for module, name, buffer, saved in self.buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)
