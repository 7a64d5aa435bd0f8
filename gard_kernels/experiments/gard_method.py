"""GARD itself as a method of the comparison: the controller with the method's GARDConfig."""
from __future__ import annotations

from typing import Sequence

from ..controller import GARD
from .method import Method, MethodRun


class GardMethod(Method):
    """GARD controller with the method's GARDConfig (presets.METHODS and GardSettings.config)."""

    def __init__(self, run: MethodRun):
        self.name, self.model = run.name, run.model
        self.config = run.settings.config(run.name, run.budget, run.seed, run.steps)
        self.gard = GARD(run.model, self.config)
        # GARD's config: r_max=None resolved to the bound the run used.
        self.details = {"gard_config": self.gard.config.to_dict()}

    @classmethod
    def minimum_budget(cls, costs: Sequence[int], settings, name: str, options: dict) -> int:
        # Every layer holds r_min units; then one more unit must fit somewhere.
        return max(min(costs), settings.value("r_min", name) * sum(costs))

    def parameters(self):
        return self.gard.lora_parameters()

    def attach(self, optimizer):
        self.gard.attach_optimizer(optimizer)

    def prepare(self, batches, loss_fn, progress=False):
        if self.config.mode == "static":
            from tqdm.auto import tqdm

            # Paper §3.3: M profiling mini-batches (forward / backward only), then one allocation;
            # the profile reuses the run's first M training batches.
            window = self.config.window
            profiled = tqdm(batches[:window], desc="profiling", unit="batch", disable=not progress, leave=False)
            self.gard.profile(profiled, steps=window, loss_fn=loss_fn)

    def after_optimizer_step(self, step):
        self.gard.step()

    def num_params(self):
        return self.gard.num_lora_params

    def ranks(self):
        return self.gard.ranks

    def backprop_modules(self):
        return [layer.name for layer in self.gard.manager.layers if layer.rank > 0 or layer.capturing]

    @property
    def history(self) -> list[dict]:
        return self.gard.history

    def reallocations(self) -> list[dict]:
        """The controller's re-allocation events, each marked whether it was the static profile's."""
        events = []
        for entry in self.history:
            if "reallocation" in entry:
                event = dict(entry["reallocation"])
                event["profile"] = bool(entry.get("profile", False))
                events.append(event)
        return events
