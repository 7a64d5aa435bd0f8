"""LoRAManager: finds the target modules of a model, wraps them in LoRALayer, resizes them."""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch
from torch import nn

from .layer import LoRALayer, _is_conv1d


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def match_target_modules(model: nn.Module, target_modules: Union[Sequence[str], str]) -> list[str]:
    """Full names of the modules selected by PEFT-style suffixes or a full-match regex.

    Raises:
        ValueError: nothing matched (the message lists the adaptable names), a match is not a
            Linear / Conv1D, or the model already holds GARD adapters.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            raise ValueError(
                f"model already has GARD adapters (at {name!r}); wrap an unwrapped model, or load "
                "the saved controller state into the existing GARD object instead"
            )
        if not name:
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            if not _is_adaptable(module):
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}; GARD adapts nn.Linear and "
                    "transformers Conv1D only: narrow target_modules"
                )
            names.append(name)
    if not names:
        candidates = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_adaptable(m)})
        raise ValueError(
            f"target_modules={target_modules!r} matched no module; adaptable module names end in: "
            f"{candidates}"
        )
    return names


class LoRAManager:
    """Owns the LoRALayers of one model, in a fixed order (the order of `named_modules`).

    Args:
        model: the model; its target modules are replaced in place.
        target_modules: suffix list or regex (see GARDConfig).
        rank: initial rank of every layer.
        scaling: constant LoRA scaling.
        generator: torch.Generator for the initial A matrices.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Union[Sequence[str], str],
        rank: int,
        scaling: float,
        generator: torch.Generator | None = None,
    ):
        self.names = match_target_modules(model, target_modules)
        self.layers: list[LoRALayer] = []
        for name in self.names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, attr)
            layer = LoRALayer(base, rank=0, scaling=scaling, name=name)
            if rank:
                layer.resize(rank, generator=generator)
            setattr(parent, attr, layer)
            self.layers.append(layer)
        self.costs = [layer.d_in + layer.d_out for layer in self.layers]
        self.caps = [min(layer.d_in, layer.d_out) for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def num_params(self, ranks: Sequence[int] | None = None) -> int:
        """sum r * (d_in + d_out) for the current (or given) ranks."""
        ranks = self.ranks if ranks is None else ranks
        return sum(r * c for r, c in zip(ranks, self.costs))

    def parameters(self) -> list[nn.Parameter]:
        """Every LoRA factor, rank-0 ones included, so a layer that grows later is already in the optimizer."""
        params = []
        for layer in self.layers:
            params += [layer.lora_A, layer.lora_B]
        return params
