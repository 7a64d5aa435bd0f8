"""What a GARD run writes and reads back: its full state for resuming (state_dict /
load_state_dict, torch.distributed.checkpoint-friendly) and its adapters as a PEFT LoRA
directory (save_pretrained / from_pretrained). The controller's methods of those names call
these; they read the controller's attributes but never drive it (`gard` below is the GARD
controller; not imported here, so the controller can import this module).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from torch import nn

from . import distributed, fsdp
from .config import R_MAX_FLOOR, GARDConfig
from .lora import peft_format
from .lora.layer import adapter_shape
from .lora.manager import find_targets
from .lora.scaling import SCALING_RULES


def run_state(gard) -> dict[str, Any]:
    """Everything needed to continue the run: config, ranks, adapters, ring, EMA, counters, history.

    Every tensor has a shape fixed by the model and config, whatever the ranks, so that
    `torch.distributed.checkpoint.load` can fill the state_dict() of a fresh GARD in place:
    the factors sit in one zero-padded vector of `budget` values ("adapter_values", layer
    after layer, A then B, row-major), and the history is a tuple, which the checkpoint
    stores as one object (it would split a list of records into entries a fresh, shorter
    history has no place for).

    Under torch.distributed every process calls it (it is collective): the sketch ring holds
    the processes' mean (which the next re-allocation's mean reproduces), and the adapters are
    checked to be identical, so every process returns the same state; save it once (process
    0, or torch.distributed.checkpoint) and load it on every process, at any world size.
    """
    fsdp.check_adapters_outside_fsdp(gard.manager.layers)
    adapters = flat_adapters(gard.manager.layers)
    fsdp.check_replicated(adapters, "GARD's LoRA factors")
    ring = gard.ring.state_dict()
    ring["buffer"], ring["valid"] = distributed.mean_over_processes(ring["buffer"], ring["valid"])
    ema = gard.ema_statistic
    return {
        "config": gard.config.to_dict(),
        "names": list(gard.manager.names),
        "shapes": [(layer.d_in, layer.d_out) for layer in gard.manager.layers],
        "ranks": gard.manager.ranks,
        "adapter_values": torch.cat([adapters, adapters.new_zeros(gard.config.budget - adapters.numel())]),
        "ring": ring,
        "has_ema_statistic": ema is not None,
        "ema_statistic": torch.zeros(len(gard.manager), dtype=torch.float64, device=gard.ring.device)
        if ema is None else ema.to(torch.float64).clone(),
        "step_count": gard.step_count,
        "allocated": gard.allocated,
        "params_sum": gard._params_sum,
        "generator": gard._generator_state.clone(),
        "history": tuple(gard.history),
    }


def flat_adapters(layers: list) -> torch.Tensor:
    """Every factor flattened, layer after layer, A then B: [num_lora_params] in the widest factor dtype."""
    factors = [t.detach() for layer in layers for t in (layer.lora_A, layer.lora_B)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in factors) else torch.float32
    return torch.cat([t.reshape(-1).to(dtype) for t in factors])


def load_run_state(gard, state: dict[str, Any]) -> None:
    """Restore a state_dict() of the same model and config; load the optimizer's state afterwards."""
    mine = gard.config.to_dict()
    for key, value in state["config"].items():
        if key in mine and _normalise(mine[key]) != _normalise(value):
            raise ValueError(f"state_dict was saved with config {key}={value!r}, this GARD has {mine[key]!r}")
    saved, mine_names = list(state["names"]), gard.manager.names
    if saved != mine_names:
        first = next((i for i, (a, b) in enumerate(zip(saved, mine_names)) if a != b), min(len(saved), len(mine_names)))
        theirs = saved[first] if first < len(saved) else "(none)"
        ours = mine_names[first] if first < len(mine_names) else "(none)"
        raise ValueError(
            f"state_dict was saved for other adapted modules: {len(saved)} adapted modules there, "
            f"{len(mine_names)} here; module #{first} is {theirs!r} there and {ours!r} here"
        )
    for name, layer, shape in zip(mine_names, gard.manager.layers, state["shapes"]):
        if tuple(shape) != (layer.d_in, layer.d_out):
            raise ValueError(
                f"state_dict was saved for a model whose module {name!r} has (d_in, d_out) = "
                f"{tuple(shape)}, here it has {(layer.d_in, layer.d_out)}"
            )
    fsdp.check_adapters_outside_fsdp(gard.manager.layers)
    factors = _saved_factors(state, gard.manager.layers)
    for layer, (lora_a, lora_b) in zip(gard.manager.layers, factors):
        layer.load_factors(lora_a, lora_b)
    gard.ring.load_state_dict(state["ring"])
    ema = state["ema_statistic"]
    if not state.get("has_ema_statistic", ema is not None):
        ema = None
    gard.ema_statistic = None if ema is None else ema.to(gard.ring.device)
    gard.step_count = state["step_count"]
    gard.allocated = state["allocated"]
    gard._params_sum = state["params_sum"]
    gard._generator.set_state(state["generator"])
    gard.history = list(state["history"])
    gard._set_capture(gard._capture_due(gard.step_count))


def _saved_factors(state: dict[str, Any], layers: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per layer from a state_dict(): the flat "adapter_values" at "ranks", or the per-layer
    "adapters" list of states saved before the flat layout."""
    if "adapter_values" not in state:
        return [(adapter["lora_A"], adapter["lora_B"]) for adapter in state["adapters"]]
    ranks, values = list(state["ranks"]), state["adapter_values"]
    if len(ranks) != len(layers):
        raise ValueError(f"state_dict has ranks for {len(ranks)} adapted modules, this GARD has {len(layers)}")
    needed = sum(r * (layer.d_in + layer.d_out) for r, layer in zip(ranks, layers))
    if values.dim() != 1 or values.numel() < needed:
        raise ValueError(
            f"state_dict's adapter_values has shape {tuple(values.shape)}, but ranks {ranks} need {needed} values"
        )
    factors, offset = [], 0
    for rank, layer in zip(ranks, layers):
        lora_a = values[offset : offset + rank * layer.d_in].view(rank, layer.d_in)
        offset += rank * layer.d_in
        lora_b = values[offset : offset + layer.d_out * rank].view(layer.d_out, rank)
        offset += layer.d_out * rank
        factors.append((lora_a, lora_b))
    return factors


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def save_peft_adapter(gard, path, task_type: Optional[str] = None) -> dict[str, Any]:
    """Write the adapters as a standard PEFT LoRA adapter directory (lora/peft_format.py).

    `peft.PeftModel.from_pretrained(base_model, path)` then computes what this model computes.

    Args:
        path: output directory; gets adapter_config.json and adapter_model.safetensors.
        task_type: PEFT task type written to the config (e.g. "CAUSAL_LM"), or None.
    Returns:
        The adapter config that was written, as a dict.
    Raises:
        ValueError: every adapter has rank 0 (PEFT cannot express an empty adapter).

    Under torch.distributed every process calls it (it is collective): the adapters are
    checked to be identical on every process, process 0 writes the directory, and every
    process returns the written config once it is on disk, or raises process 0's error.
    """
    fsdp.check_adapters_outside_fsdp(gard.manager.layers)
    fsdp.check_replicated(flat_adapters(gard.manager.layers), "GARD's LoRA factors")
    config = peft_format.adapter_config(gard.manager.layers, gard.model, task_type)
    distributed.on_rank_zero(lambda: peft_format.write_adapter(gard.manager.layers, gard.model, path, task_type))
    return config


def gard_from_peft_adapter(cls: type, model: nn.Module, path, config: Optional[GARDConfig] = None):
    """Wrap `model` with the adapters of a PEFT LoRA adapter directory, to continue training.

    Each adapted layer gets the saved rank and factors; adapted layers absent from the adapter
    (rank 0 at export) start at rank 0. The adapter's per-layer lora_alpha / r is folded into
    B when it differs from the config's `scaling`, so the model computes what PEFT would.
    Attach an optimizer afterwards, as after `GARD(model, config)`. In static mode the adapter's
    ranks count as the allocation (no profile, no re-allocation); dynamic mode re-allocates from
    them on its schedule.

    Args:
        model: the base model, not yet wrapped.
        path: directory with adapter_config.json and adapter_model.safetensors (GARD's export
            or any plain PEFT LoRA adapter on Linear / Conv1D modules).
        config: GARDConfig of the continued run; its target_modules must cover the adapter's
            modules and its budget the adapter's parameters. None: the adapter's modules only,
            budget = the adapter's parameter count, and PEFT's own scale at every rank
            (lora_alpha / r, or / sqrt(r) with use_rslora: scaling_rule "linear" or "rslora").
    Raises:
        ValueError: not a LoRA adapter GARD can represent (DoRA, biases, modules_to_save,
            other weight names), or it does not fit `config` (modules, shapes, ranks, budget);
            checked before the model is touched.
    """
    adapter = peft_format.read_adapter(path)
    if config is None:
        config = _config_of_adapter(adapter)
    if config.r_max is None:
        costs = [sum(adapter_shape(t.module)) for t in find_targets(model, config.target_modules)]
        config = config.with_resolved_r_max(costs)
    adapter.check_fits(model, config.target_modules, config.r_max, config.budget)
    gard = cls(model, config)
    for name, layer in zip(gard.names, gard.manager.layers):
        a, b = adapter.factors.get(name, (None, None))
        if a is None:
            a, b = layer.lora_A.new_zeros(0, layer.d_in), layer.lora_B.new_zeros(layer.d_out, 0)
        else:
            b = b * (adapter.scalings[name] / layer.scale_at(a.shape[0]))
        layer.load_factors(a, b)
    if config.mode == "static":
        # The adapter's ranks are static mode's one allocation: the continued run trains them and
        # never profiles or re-allocates (which would re-initialise what was loaded).
        gard.allocated = True
        gard._set_capture(gard._capture_due(gard.step_count))
    return gard


def _config_of_adapter(adapter: peft_format.AdapterFile) -> GARDConfig:
    """The config that continues a PEFT adapter as PEFT would train it: its modules, its parameter
    count as the budget, and the rule its scales follow, so that nothing is folded into B (the
    factors' gradients are PEFT's) and a later resize keeps the rule: "rslora" with use_rslora
    (lora_alpha / sqrt(r)), "constant" where unequal ranks share one scale (GARD's export of that
    rule), else PEFT's lora_alpha / r ("linear"). A module whose alpha_pattern breaks the rule has
    its scale folded into B."""
    names = list(adapter.factors)
    ranks = [a.shape[0] for a, _ in adapter.factors.values()]
    scales = [adapter.scalings[name] for name in names]
    if adapter.config.get("use_rslora"):
        rule = "rslora"
    elif len(set(ranks)) > 1 and all(math.isclose(s, scales[0], rel_tol=1e-9) for s in scales):
        rule = "constant"
    else:
        rule = "linear"
    costs = [a.shape[1] + b.shape[0] for a, b in adapter.factors.values()]
    r_ref = adapter.num_params / sum(costs)  # GARD's reference rank: budget / Σ(d_in + d_out)
    return GARDConfig(
        budget=adapter.num_params,
        target_modules="|".join(re.escape(n) for n in names),
        r_init=0,
        r_max=max(R_MAX_FLOOR, adapter.max_rank),
        # scale(r) = scaling * (r_ref / r)^p equals the first module's PEFT scale at its rank.
        scaling=scales[0] * (ranks[0] / r_ref) ** SCALING_RULES[rule],
        scaling_rule=rule,
    )
