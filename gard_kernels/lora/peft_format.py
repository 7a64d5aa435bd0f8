"""The PEFT LoRA adapter format of LoRA layers: write factors + config, read them back.

A LoRALayer computes y = W x + scaling * B A x with its current `scaling`; PEFT computes
y = W x + (lora_alpha / r) * B A x, or (lora_alpha / sqrt(r)) * B A x with use_rslora. The adapter
written here has, per layer, r = its rank and lora_alpha = scaling * r (rank_pattern /
alpha_pattern), so PEFT reproduces the layers' outputs. Layers whose scale follows rsLoRA's rule
(scaling_rule="rslora": scale(r) = s * sqrt(r_ref / r)) are written with use_rslora and
lora_alpha = scaling * sqrt(r) = s * sqrt(r_ref) per layer, one alpha for every rank as in
rsLoRA itself, so a PEFT run that changes a rank keeps GARD's rule.
Rank-0 layers are left out: PEFT has no rank-0 adapters and they add nothing. This module knows
LoRA layers and the model they sit in, nothing of the GARD controller (GARD.save_pretrained and
GARD.from_pretrained call it).

Names: PEFT selects modules with `target_modules` (a list matches a module whose name equals an
entry or ends with "." + entry) and looks up per-module ranks with the first `rank_pattern` key
K such that re.match(rf"(.*\\.)?({K})$", name) succeeds. Full module names are exact for almost
every model; where some other module's name ends with "." + an exported name, or a key would
match another exported module, the export switches to patterns that cannot over-match (a
full-match regex for target_modules, "^"-anchored escaped keys for the patterns).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .layer import LoRALayer, adapter_shape
from .scaling import RankScaling
from .manager import match_target_modules, matches_target_list

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "AdapterFile", "adapter_config", "read_adapter", "write_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT stores the weights of a PeftModel's base model under this prefix (adapter name removed).
_KEY_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B")


def write_adapter(
    layers: list[LoRALayer], model: nn.Module, path: str | os.PathLike, task_type: Optional[str] = None
) -> dict[str, Any]:
    """Write `layers` as a PEFT LoRA adapter directory of `model`.

    `peft.PeftModel.from_pretrained(base_model, path)` then computes what the wrapped model
    computes, and `.merge_and_unload()` gives a plain model with the updates merged.

    Args:
        layers: the model's LoRALayers.
        model: the model they sit in (for module names and its config's name).
        path: output directory (created if missing); gets adapter_config.json and
            adapter_model.safetensors.
        task_type: PEFT task type written to the config (e.g. "CAUSAL_LM"), or None.
    Returns:
        The adapter config that was written, as a dict.
    Raises:
        ValueError: every layer has rank 0 (PEFT cannot express an empty adapter).
    """
    from safetensors.torch import save_file

    config = adapter_config(layers, model, task_type)
    tensors = {}
    for layer in layers:
        if layer.rank == 0:
            continue
        for factor in _FACTORS:
            value = getattr(layer, factor).detach()
            tensors[f"{_KEY_PREFIX}{layer.name}.{factor}.weight"] = value.to("cpu").contiguous()

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return config


def adapter_config(layers: list[LoRALayer], model: nn.Module, task_type: Optional[str] = None) -> dict[str, Any]:
    """The PEFT LoRA adapter config of `layers` at their current ranks, as a dict.

    What write_adapter writes to adapter_config.json, and what suggest_lora_config turns into a
    peft.LoraConfig: rank-0 layers left out, per-layer r and lora_alpha = scaling * r (scaling *
    sqrt(r) with use_rslora, where every layer follows scaling_rule="rslora").

    Args:
        layers: the model's LoRALayers.
        model: the model they sit in.
        task_type: PEFT task type (e.g. "CAUSAL_LM"), or None.
    Raises:
        ValueError: every layer has rank 0 (PEFT cannot express an empty adapter).
    """
    layers = [layer for layer in layers if layer.rank > 0]
    if not layers:
        raise ValueError("every GARD adapter has rank 0: there is nothing to export")
    names = [layer.name for layer in layers]
    ranks = {layer.name: layer.rank for layer in layers}
    rslora = _follows_rslora(layers)
    # PEFT's scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora): the alpha that gives
    # each layer its current scale.
    alphas = {
        layer.name: _plain_number(layer.scaling * (math.sqrt(layer.rank) if rslora else layer.rank))
        for layer in layers
    }
    r_default = max(ranks.values())
    if rslora:
        # rsLoRA's alpha is the same at every rank: s * sqrt(r_ref), also for ranks PEFT adds later.
        rule = layers[0].rank_scaling
        alpha_default = _plain_number(rule.scaling * math.sqrt(rule.r_ref))
    else:
        alpha_default = _plain_number(layers[0].scaling * r_default)

    base_names = _unwrapped_module_names(model)
    # PEFT's list semantics would also pick up a module whose name ends with "." + a target.
    if any(matches_target_list(n, names) for n in base_names if n not in ranks):
        target_modules: list[str] | str = "|".join(re.escape(n) for n in names)
    else:
        target_modules = names
    # Each exported module must be matched first by its own key, whatever the key order.
    if any(_pattern_hit(key, other) for key in names for other in names if other != key):
        keys = {name: "^" + re.escape(name) for name in names}
    else:
        keys = {name: name for name in names}

    model_config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "exclude_modules": None,
        "fan_in_fan_out": all(not isinstance(layer.base, nn.Linear) for layer in layers),
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {keys[n]: ranks[n] for n in names},
        "alpha_pattern": {keys[n]: alphas[n] for n in names},
    }


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT LoRA adapter as read from disk.

    Attributes:
        config: adapter_config.json as a dict.
        factors: {module name: (A [r, d_in], B [d_out, r])}.
        scalings: {module name: PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA) of that module}.
    """

    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]

    @property
    def num_params(self) -> int:
        return sum(a.shape[0] * (a.shape[1] + b.shape[0]) for a, b in self.factors.values())

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def check_fits(self, model: nn.Module, target_modules, r_max: int, budget: int) -> None:
        """Raise before anything is wrapped if the adapter does not fit the model and the bounds.

        Args:
            model: the unwrapped base model.
            target_modules: suffix list or regex (GARDConfig's) that must select every adapter module.
            r_max: largest rank allowed.
            budget: parameter budget the adapter must fit.
        """
        targeted = set(match_target_modules(model, target_modules))
        missing = [name for name in self.factors if name not in targeted]
        if missing:
            raise ValueError(
                f"adapter modules {missing[:3]}{'...' if len(missing) > 3 else ''} are not among GARD's adapted "
                f"modules for target_modules={target_modules!r}"
            )
        for name, (a, b) in self.factors.items():
            expected = adapter_shape(model.get_submodule(name))
            rank, d_in, d_out = a.shape[0], a.shape[1], b.shape[0]
            if (d_in, d_out) != expected:
                raise ValueError(
                    f"adapter module {name!r} has (d_in, d_out) = {(d_in, d_out)}, the model's layer {expected}"
                )
            if rank > min(r_max, d_in, d_out):
                raise ValueError(f"adapter module {name!r} has rank {rank}, above r_max={r_max} (or the layer's size)")
        if self.num_params > budget:
            raise ValueError(f"the adapter has {self.num_params} LoRA parameters, over the config's budget {budget}")


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a PEFT LoRA adapter directory (GARD's export or any plain PEFT LoRA adapter).

    Raises:
        ValueError: not a LoRA adapter GARD can represent (DoRA, biases, modules_to_save, other
            weight names).
    """
    from safetensors.torch import load_file

    with open(os.path.join(path, ADAPTER_CONFIG_NAME)) as handle:
        peft_config = json.load(handle)
    _check_supported(peft_config)
    factors = _read_factors(load_file(os.path.join(path, ADAPTER_WEIGHTS_NAME)))
    scalings = {}
    for name, (a, _) in factors.items():
        rank = a.shape[0]
        alpha = peft_config.get("lora_alpha", 8)
        for key, value in (peft_config.get("alpha_pattern") or {}).items():
            if _pattern_hit(key, name):
                alpha = value
                break
        scalings[name] = alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)
    return AdapterFile(peft_config, factors, scalings)


def _check_supported(peft_config: dict[str, Any]) -> None:
    peft_type = str(peft_config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={peft_config.get('peft_type')!r}")
    unsupported = {
        "use_dora": bool(peft_config.get("use_dora")),
        "bias": peft_config.get("bias", "none") != "none",
        "lora_bias": bool(peft_config.get("lora_bias")),
        "modules_to_save": bool(peft_config.get("modules_to_save")),
    }
    found = [key for key, bad in unsupported.items() if bad]
    if found:
        raise ValueError(f"GARD adapters are plain LoRA (B A, no biases, no extra modules); this adapter sets {found}")


def _read_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, d_in], B [d_out, r])} from PEFT weight names."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"{re.escape(_KEY_PREFIX)}(.+)\.(lora_A|lora_B)\.weight")
    for key, value in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ValueError(
                f"unexpected weight {key!r} in the adapter: GARD reads "
                f"'{_KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' only"
            )
        parts.setdefault(match.group(1), {})[match.group(2)] = value
    factors = {}
    for name, pair in parts.items():
        if set(pair) != set(_FACTORS):
            raise ValueError(f"adapter module {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "[r, d_in] and [d_out, r]"
            )
        factors[name] = (a, b)
    if not factors:
        raise ValueError("the adapter holds no LoRA weights")
    return factors


def _unwrapped_module_names(model: nn.Module) -> list[str]:
    """Module names of the model as it is without GARD (a LoRALayer stands for its base)."""
    inner = [name + "." for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    return [name for name, _ in model.named_modules() if name and not any(name.startswith(p) for p in inner)]


def _pattern_hit(key: str, name: str) -> bool:
    """PEFT's rule for a rank_pattern / alpha_pattern key."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _follows_rslora(layers: list[LoRALayer]) -> bool:
    """Whether every layer's scale is rsLoRA's s * sqrt(r_ref / r), with one s and r_ref."""
    rules = {layer.rank_scaling for layer in layers}
    if len(rules) != 1:
        return False
    rule = rules.pop()
    return isinstance(rule, RankScaling) and rule.rule == "rslora"


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)
