"""The interface every method of the comparison implements, so all share one training loop.

A new baseline is one file in baselines/ with one Method subclass, plus one line in
baselines.BASELINES (its name there is the method's name on the command line). The training
loop (runner.py) calls, in this order:

    method = Kind(run)                      # wrap run.model (modified in place)
    optimizer = AdamW(method.parameters())
    method.attach(optimizer)
    method.prepare(batches, loss_fn)        # look at data before the first step (optional)
    for each step:
        method.num_params(); method.backprop_modules()
        forward, backward, optimizer.step()
        method.after_optimizer_step(step)   # optional
        method.ranks()
    method.details                          # written to metrics.json

Required: `__init__(run)` (setting `name`, `model` and `details`), `parameters`, `num_params`,
`ranks`. The rest have defaults. `minimum_budget` tells grids, before any model is wrapped,
the smallest budget at which the method adapts anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class MethodRun:
    """What a method is built from: one run's facts.

    Attributes:
        name: the method's name (a key of presets.METHODS or presets.LEGACY_METHODS).
        model: the model to wrap, frozen; modified in place.
        budget: LoRA parameter budget, Σ r (d_in + d_out) for LoRA layers.
        settings: the comparison's GARD settings; `settings.value(field, name)` gives the bounds
            (target_modules, r_min, r_max, scaling, window) the method runs under.
        seed: adapter initialisation seed.
        steps: optimizer steps of the run.
        lr: the run's learning rate (GoRA's initialisation is one gradient step of this size).
        options: the method's own hyperparameters from its registry entry (presets.METHODS
            "options"; empty for most), e.g. GoRA's initial step size.
    """

    name: str
    model: nn.Module
    budget: int
    # settings.GardSettings (not imported: settings reads the registry, which imports the methods)
    settings: Any
    seed: int
    steps: int
    lr: float
    options: dict = field(default_factory=dict)


class Method:
    """One method wrapped around a model. Subclasses fill in the hooks (see the module docstring).

    Attributes:
        name: method name.
        model: what the training loop calls (the model itself, or PEFT's wrapper).
        details: method-specific facts for metrics.json (plans, conversions).
    """

    name: str
    model: nn.Module
    details: dict

    def __init__(self, run: MethodRun):
        raise NotImplementedError

    @classmethod
    def minimum_budget(cls, costs: Sequence[int], settings: Any, name: str, options: dict) -> int:
        """Smallest budget at which method `name` (with its registry `options`) adapts at least one
        module of costs [L] d_in + d_out. Default: one rank unit of the cheapest module."""
        return min(costs)

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once, after the optimizer is built from parameters()."""

    def prepare(self, batches: Sequence[torch.Tensor], loss_fn: Callable, progress: bool = False) -> None:
        """Before the first optimizer step (static GARD, GoRA and EVA look at data here).

        Args:
            batches: the run's training batches, in order ([B, T] token ids each).
            loss_fn: loss_fn(model, batch) -> scalar loss, under the run's precision.
        """

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer.step() of step `step` (0-based), before zero_grad()."""

    def num_params(self) -> int:
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        """Adapted module name -> current rank, in model order."""
        raise NotImplementedError

    def backprop_modules(self) -> list[str]:
        """Adapted modules the next backward pass must reach: those with rank > 0 (GARD also
        reaches every capturing module, whatever its rank)."""
        return [name for name, rank in self.ranks().items() if rank > 0]
