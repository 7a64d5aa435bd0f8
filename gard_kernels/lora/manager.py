"""LoRAManager: finds the target modules of a model, wraps them in LoRALayer, resizes them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from .layer import LoRALayer, is_conv1d


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


# PEFT's shorthand for target_modules (same spelling, compared case-insensitively as PEFT does):
# every adaptable module except the model's output layer.
ALL_LINEAR_SHORTHAND = "all-linear"


def is_all_linear(target_modules: Union[Sequence[str], str]) -> bool:
    """Whether `target_modules` is PEFT's "all-linear" shorthand (one string, any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR_SHORTHAND


def _output_layer_ids(model: nn.Module) -> set[int]:
    """ids of what "all-linear" leaves out: the module `model.get_output_embeddings()` returns (the
    LM head) and anything inside it; empty when it returns None (a model without an LM head).

    Raises:
        ValueError: the model has no get_output_embeddings (not a transformers model), so its
            output layer cannot be told apart from the other Linear layers.
    """
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        raise ValueError(
            f'target_modules="{ALL_LINEAR_SHORTHAND}" needs a transformers model whose output layer it can '
            f"leave out (one with get_output_embeddings); {type(model).__name__} has none: pass the module names "
            '(a list, e.g. ["q_proj", "v_proj"]) or a regular expression instead'
        )
    output = get_output_embeddings()
    return {id(module) for module in output.modules()} if isinstance(output, nn.Module) else set()


@dataclass(frozen=True)
class Target:
    """One module to adapt.

    Attributes:
        name: its first full name in `named_modules` order (the name GARD reports and exports).
        paths: every full name under which the model reaches the same module object; one adapter
            replaces it on all of them, so a shared module stays shared (and is one budget entry).
        module: the nn.Linear / Conv1D itself.
    """

    name: str
    paths: tuple[str, ...]
    module: nn.Module


def matches_target_list(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target_modules: `name` is a target, or ends in "." + a target
    ("q_proj" matches "model.layers.0.self_attn.q_proj", not "model.layers.0.self_attn.xq_proj")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, target_modules: Union[Sequence[str], str]) -> list[Target]:
    """The modules selected by PEFT-style suffixes, a full-match regex or PEFT's "all-linear";
    reads, never changes, the model.

    "all-linear" (any case) selects every nn.Linear / Conv1D (bitsandbytes 4-bit and 8-bit
    included) except the output layer, `model.get_output_embeddings()`, under whatever names it
    is registered (a model whose get_output_embeddings returns None, e.g. a classifier, has
    none to leave out).

    A module reachable under several names (registered at two parents) is selected when any of its
    names matches, and is listed once, at its first name, with all of them.

    Raises:
        ValueError: nothing matched (the message lists the adaptable names), a match is not a
            Linear / Conv1D, the model already holds GARD adapters, or "all-linear" on a model
            without get_output_embeddings.
    """
    all_linear = is_all_linear(target_modules)
    # Looked up before the walk: a refused model is refused whatever it holds.
    left_out = _output_layer_ids(model) if all_linear else set()
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    hits: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoRALayer):
            raise ValueError(
                f"model already has GARD adapters (at {name!r}); wrap an unwrapped model, or load "
                "the saved controller state into the existing GARD object instead"
            )
        if not name:
            continue
        paths.setdefault(id(module), []).append(name)
        modules[id(module)] = module
        if all_linear:
            hit = _is_adaptable(module) and id(module) not in left_out
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = matches_target_list(name, target_modules)
        if hit:
            if not _is_adaptable(module):
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}; GARD adapts nn.Linear and transformers "
                    "Conv1D only (bitsandbytes Linear4bit / Linear8bitLt included), not other quantised layers "
                    "(GPTQ, AWQ, HQQ, ...): narrow target_modules or load the model unquantised"
                )
            hits.add(id(module))
    if not hits:
        candidates = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_adaptable(m)})
        if all_linear:
            how = ": the model has no nn.Linear / Conv1D besides its output layer"
        elif isinstance(target_modules, str):
            how = (
                "; one string is read as a regular expression that must match a full module name (re.fullmatch): "
                f"pass a list, e.g. [{target_modules!r}], to match names by suffix, or a pattern such as "
                f"'.*\\.{target_modules}'"
            )
        elif any(is_all_linear(t) for t in target_modules):
            how = (
                f'; "{ALL_LINEAR_SHORTHAND}" is a shorthand only as the whole value: '
                f'target_modules="{ALL_LINEAR_SHORTHAND}", not a list'
            )
        else:
            how = ""
        raise ValueError(
            f"target_modules={target_modules!r} matched no module{how}; adaptable module names end in: "
            f"{candidates}"
        )
    # dicts keep insertion order: the order of first appearance in named_modules.
    return [Target(names[0], tuple(names), modules[key]) for key, names in paths.items() if key in hits]


def match_target_modules(model: nn.Module, target_modules: Union[Sequence[str], str]) -> list[str]:
    """Full names of the selected modules (the first name of each; see find_targets)."""
    return [target.name for target in find_targets(model, target_modules)]


def _set_at(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


class LoRAManager:
    """Owns the LoRALayers of one model, in a fixed order (the order of `named_modules`).

    Construction replaces every name of every target module by its LoRALayer, all or nothing;
    `unwrap()` puts the original modules back.

    Args:
        model: the model; its target modules are replaced in place.
        target_modules: suffix list, regex or "all-linear" (see GARDConfig).
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
        self.model = model
        self.targets = find_targets(model, target_modules)
        self.names = [target.name for target in self.targets]
        self.layers: list[LoRALayer] = []
        try:
            for target in self.targets:
                layer = LoRALayer(target.module, rank=0, scaling=scaling, name=target.name)
                if rank:
                    layer.resize(rank, generator=generator)
                self.layers.append(layer)
                for path in target.paths:
                    _set_at(model, path, layer)
        except BaseException:
            self.unwrap()
            raise
        self.costs = [layer.d_in + layer.d_out for layer in self.layers]
        self.caps = [min(layer.d_in, layer.d_out) for layer in self.layers]

    def unwrap(self) -> None:
        """Put the original modules back under every name (the adapters are discarded)."""
        for target in self.targets:
            for path in target.paths:
                _set_at(self.model, path, target.module)

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
