"""When GARD captures and re-allocates, and how a re-allocation moves ranks: static or dynamic.

The controller runs the same steps in both modes (capture, score, allocate, resize); what the
mode changes is here, in one object per mode, so the controller never asks which mode it runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .allocate import clip_rank_change
from .config import GARDConfig
from .lora.layer import LoRALayer

__all__ = ["DynamicSchedule", "StaticSchedule", "make_schedule"]


class StaticSchedule:
    """Paper §3.3: capture the first `window` steps, allocate once, re-initialise every adapter.

    Args:
        config: the run's GARDConfig.
    """

    # The one allocation re-initialises every adapter, so it always needs the optimizer; and a
    # window too thin to allocate from is an error (no later window follows).
    reinitialises_every_layer = True
    skips_thin_windows = False

    def __init__(self, config: GARDConfig):
        self.config = config

    def reallocation_due(self, t: int, allocated: bool) -> bool:
        """Whether ranks are re-allocated when the optimizer step count reaches t."""
        return not allocated and t == self.config.window

    def capture_due(self, t: int, allocated: bool) -> bool:
        """Whether the step that runs next (index t, 0-based) must write sketches."""
        return not allocated and t < self.config.window

    def most_growth(self) -> int:
        """The most directions one layer can gain at one re-allocation (every layer restarts from 0)."""
        return self.config.r_max

    def smooth(self, previous: Optional[torch.Tensor], statistic: torch.Tensor) -> torch.Tensor:
        """The one allocation uses the window's statistic as it is."""
        return statistic

    def hysteresis(self, current: list[int], allocated: bool) -> tuple[Optional[list[int]], float]:
        """(current, dead_band) for allocate_ranks: none, the provisional r_init was chosen by no spectrum."""
        return None, 0.0

    def limit(self, old: Sequence[int], target: list[int], costs: Sequence[int], budget: int) -> list[int]:
        """The ranks taken now: the target itself."""
        return target

    def layers_to_resize(self, old: Sequence[int], new: Sequence[int]) -> list[int]:
        """Every layer: all adapters are re-initialised at their new rank."""
        return list(range(len(new)))

    def start_rank(self, layer: LoRALayer) -> int:
        """The rank a resized layer grows from (0: it is re-initialised)."""
        return 0

    def resize(self, layer: LoRALayer, rank: int, optimizer, generator) -> float:
        """Re-initialise `layer` at `rank` (A random and B zero, or from the gradient per grow_init);
        returns the discarded update norm (0: a re-initialisation keeps nothing by design)."""
        layer.resize(0, optimizer=optimizer)
        layer.resize(rank, grow_init=self.config.layer_grow_init, optimizer=optimizer, generator=generator)
        return 0.0


class DynamicSchedule:
    """Paper §3.4: re-allocate every `interval` steps after `warmup`, capturing the `window`
    steps before each; moves are smoothed (EMA), held back by the dead-band and clipped to
    ±delta_max, and a layer keeps what it learned in the directions it keeps.

    Args:
        config: the run's GARDConfig.
    """

    # A re-allocation may leave every rank as it is; a window too thin to allocate from is skipped
    # (with a warning): the next window may be fine.
    reinitialises_every_layer = False
    skips_thin_windows = True

    def __init__(self, config: GARDConfig):
        self.config = config

    def reallocation_due(self, t: int, allocated: bool) -> bool:
        cfg = self.config
        if t < max(cfg.warmup_steps, 1) or t % cfg.interval != 0:
            return False
        return cfg.freeze_after is None or t <= cfg.freeze_after

    def capture_due(self, t: int, allocated: bool) -> bool:
        # Open the window over the M steps before each re-allocation.
        return any(self.reallocation_due(s, allocated) for s in range(t + 1, t + 1 + self.config.window))

    def most_growth(self) -> int:
        return self.config.delta_max

    def smooth(self, previous: Optional[torch.Tensor], statistic: torch.Tensor) -> torch.Tensor:
        """EMA of the statistic across re-allocations (the first one is taken as it is)."""
        if previous is None:
            return statistic
        return self.config.ema * previous + (1.0 - self.config.ema) * statistic

    def hysteresis(self, current: list[int], allocated: bool) -> tuple[Optional[list[int]], float]:
        """Ties keep the current ranks; after the first allocation a unit moves only for a gain
        above the dead-band (the first one starts from r_init, which no spectrum chose)."""
        return current, self.config.dead_band if allocated else 0.0

    def limit(self, old: Sequence[int], target: list[int], costs: Sequence[int], budget: int) -> list[int]:
        """Each layer moves toward the target by at most delta_max, within the budget."""
        return clip_rank_change(old, target, costs, budget, self.config.delta_max)

    def layers_to_resize(self, old: Sequence[int], new: Sequence[int]) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(old, new)) if a != b]

    def start_rank(self, layer: LoRALayer) -> int:
        return layer.rank

    def resize(self, layer: LoRALayer, rank: int, optimizer, generator) -> float:
        """Grow (per grow_init) or shrink (per shrink) in place; returns the discarded update norm."""
        cfg = self.config
        change = layer.resize(
            rank, grow_init=cfg.layer_grow_init, shrink=cfg.shrink, optimizer=optimizer, generator=generator
        )
        return change.discarded_norm


def make_schedule(config: GARDConfig) -> StaticSchedule | DynamicSchedule:
    """The schedule of config.mode."""
    return {"static": StaticSchedule, "dynamic": DynamicSchedule}[config.mode](config)
