"""Every method of the comparison behind one interface, so they share one training loop.

GARD variants and the non-spectral baselines (gradient norm, random) run through the GARD
controller with a different `score`; uniform LoRA uses the same LoRA layers at fixed ranks with
capture off (no sketching, no overhead); AdaLoRA is PEFT's implementation, its rank budget
converted from our parameter budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import GARDConfig
from ..controller import GARD
from ..lora.manager import LoRAManager, match_target_modules

# Method name -> how it is built. "gard" entries give the controller's mode and score; an
# optional "settings" dict overrides GardSettings fields for that method (recorded in metrics).
METHODS: dict[str, dict[str, Any]] = {
    "gard-dynamic": {"kind": "gard", "mode": "dynamic", "score": "spectral"},
    "gard-static": {"kind": "gard", "mode": "static", "score": "spectral"},
    "uniform": {"kind": "uniform"},
    "grad-norm": {"kind": "gard", "mode": "dynamic", "score": "grad_norm"},
    "random": {"kind": "gard", "mode": "dynamic", "score": "random"},
    # Added after the first grid (docs/results.md): the gradient-norm score beat the spectral one,
    # and a static profile beat the dynamic warm-up at rank 0 under the paper's tight budget.
    "grad-norm-static": {"kind": "gard", "mode": "static", "score": "grad_norm"},
    "adalora": {"kind": "adalora"},
}

# Methods whose ranks come from the effective rank of gradient spectra: the ones the α / k / M
# ablation varies.
SPECTRAL_METHODS = tuple(name for name, spec in METHODS.items() if spec.get("score") == "spectral")


@dataclass
class GardSettings:
    """GARD hyperparameters shared by every run of a comparison (see GARDConfig for each).

    Paper symbols: alpha = α (energy threshold), beta = β (EMA), tau = τ (interval),
    M = window, k = sketch size per side (k_in = k_out = k), delta_max = Δmax.
    """

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    alpha: float = 0.9
    beta: float = 0.7
    tau: int = 4
    M: int = 4
    k: int = 16
    delta_max: int = 2
    r_min: int = 0
    r_max: int = 8
    warmup: Optional[int] = None
    measure: str = "energy"
    scaling: float = 2.0
    backend: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


class Method:
    """One method wrapped around a model. Subclasses fill in the hooks.

    Attributes:
        name: method name.
        model: what the training loop calls (the model itself, or PEFT's wrapper).
        details: method-specific facts for metrics.json (plans, conversions).
    """

    name: str
    model: nn.Module
    details: dict

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once, after the optimizer is built from parameters()."""

    def prepare(self, batches: Sequence[torch.Tensor], loss_fn: Callable, progress: bool = False) -> None:
        """Before the first optimizer step (static GARD profiles here)."""

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer.step() of step `step` (0-based), before zero_grad()."""

    def num_params(self) -> int:
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        raise NotImplementedError

    def step_record(self) -> dict:
        """Method-specific entries of this step's history record (after after_optimizer_step)."""
        return {}


class GardMethod(Method):
    """GARD controller with a spectral, gradient-norm or random score.

    Dynamic runs never re-allocate at the last step (freeze_after = steps - 1): nothing would
    train the new ranks before the final evaluation.
    """

    def __init__(
        self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, mode: str, score: str, steps: int
    ):
        self.name, self.model = name, model
        self.config = GARDConfig(
            budget=budget,
            target_modules=list(settings.target_modules),
            mode=mode,
            score=score,
            r_min=settings.r_min,
            r_max=settings.r_max,
            window=settings.M,
            k_in=settings.k,
            k_out=settings.k,
            alpha=settings.alpha,
            measure=settings.measure,
            interval=settings.tau,
            ema=settings.beta,
            delta_max=settings.delta_max,
            warmup=settings.warmup,
            # A re-allocation after the last optimizer step could only drop what was learned.
            freeze_after=max(0, steps - 1),
            scaling=settings.scaling,
            seed=seed,
            backend=settings.backend,
        )
        self.gard = GARD(model, self.config)
        self.details = {"gard_config": self.config.to_dict()}
        self._last_event: Optional[dict] = None

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
        self._last_event = self.gard.step()

    def num_params(self):
        return self.gard.num_lora_params

    def ranks(self):
        return self.gard.ranks

    @property
    def history(self) -> list[dict]:
        return self.gard.history


class UniformMethod(Method):
    """Standard LoRA: one rank everywhere, through GARD's LoRA layers with capture off.

    The rank is the largest r with r * Σ(d_in + d_out) <= budget (capped per layer at
    min(d_in, d_out)). When even rank 1 everywhere exceeds the budget, rank 1 goes to as many
    modules as fit, walking from the last module (deepest layer) towards the first and skipping
    a module whose unit no longer fits; the rest get rank 0.
    """

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int):
        self.name, self.model = name, model
        generator = torch.Generator().manual_seed(seed)
        self.manager = LoRAManager(model, list(settings.target_modules), 0, settings.scaling)
        plan, fallback = uniform_ranks(self.manager.costs, self.manager.caps, budget)
        for layer, rank in zip(self.manager.layers, plan):
            layer.resize(rank, generator=generator)
        self.details = {"uniform_rank": max(plan), "last_layers_fallback": fallback, "plan": dict(zip(self.manager.names, plan))}

    def parameters(self):
        return self.manager.parameters()

    def num_params(self):
        return self.manager.num_params()

    def ranks(self):
        return dict(zip(self.manager.names, self.manager.ranks))


def uniform_ranks(costs: Sequence[int], caps: Sequence[int], budget: int) -> tuple[list[int], bool]:
    """Uniform LoRA's ranks under a parameter budget (see UniformMethod).

    Returns:
        (ranks, fallback): fallback is True when rank 1 everywhere did not fit.
    """
    rank = budget // sum(costs)
    if rank >= 1:
        return [min(rank, cap) for cap in caps], False
    ranks = [0] * len(costs)
    left = budget
    for i in reversed(range(len(costs))):
        if costs[i] <= left and caps[i] >= 1:
            ranks[i] = 1
            left -= costs[i]
    return ranks, True


class AdaLoraMethod(Method):
    """PEFT's AdaLoRA with its final parameter count held within our parameter budget.

    AdaLoRA budgets ranks, not parameters: after pruning it keeps `target_bgt` singular triplets
    in total, each costing d_in + d_out + 1 parameters (a column of A, a row of B, one entry of
    E). Which modules keep them is its choice, so the total rank is converted conservatively,
    target_bgt = floor(budget / max cost), so the final count is within the budget wherever the
    triplets land. The per-module average target_r of AdaLoraConfig is an int and cannot express
    e.g. 2 triplets over 60 modules, so target_bgt is set on the rank allocator directly.

    Schedule: init_r = ceil(1.5 * target_bgt / modules) (>= 1), tinit = steps // 5, tfinal =
    max(1, steps // 4) (>= 1 so the final masking happens inside the run), deltaT = 1,
    total_step = steps; update_and_allocate(step) after every optimizer step. lora_alpha =
    scaling * init_r, so its update scale alpha / r equals GARD's constant `scaling`.
    Before pruning ends it holds more than the budget: metrics report its mean and final counts.
    """

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, steps: int):
        from peft import AdaLoraConfig, get_peft_model

        self.name = name
        names = match_target_modules(model, list(settings.target_modules))
        shapes = {}
        for full in names:
            base = model.get_submodule(full)
            d_out, d_in = base.weight.shape if isinstance(base, nn.Linear) else base.weight.shape[::-1]
            shapes[full] = (d_in, d_out)
        costs = [d_in + d_out + 1 for d_in, d_out in shapes.values()]
        total_rank = budget // max(costs)
        if total_rank < 1:
            raise ValueError(f"adalora: budget {budget} is below one triplet of the largest module ({max(costs)} parameters)")
        if steps < 3:
            raise ValueError(f"adalora needs at least 3 steps (warm-up, pruning, final phase), got {steps}")
        init_r = max(1, math.ceil(1.5 * total_rank / len(names)))
        if init_r * len(names) <= total_rank:
            init_r += 1
        tinit = steps // 5
        tfinal = max(1, steps // 4)
        if tinit >= steps - tfinal:
            tinit = 0
        config = AdaLoraConfig(
            target_modules=list(settings.target_modules),
            init_r=init_r,
            target_r=1,
            lora_alpha=settings.scaling * init_r,
            lora_dropout=0.0,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=1,
            total_step=steps,
            beta1=0.85,
            beta2=0.85,
            orth_reg_weight=0.5,
        )
        self.model = get_peft_model(model, config)
        allocator = self.model.base_model.rankallocator
        allocator.target_bgt = total_rank
        self.peft_config = config
        self.names = names
        self.init_r = init_r
        self._cost = {full: shapes[full][0] + shapes[full][1] + 1 for full in names}
        self.details = {
            "total_rank_budget": total_rank,
            "triplet_costs": sorted(set(costs)),
            "init_r": init_r,
            "tinit": tinit,
            "tfinal": tfinal,
            "deltaT": 1,
            "total_step": steps,
            "orth_reg_weight": 0.5,
            "lora_alpha": settings.scaling * init_r,
        }

    def parameters(self):
        return [p for n, p in self.model.named_parameters() if p.requires_grad]

    def after_optimizer_step(self, step):
        self.model.base_model.update_and_allocate(step)

    def ranks(self):
        pattern = self.model.peft_config["default"].rank_pattern
        if not pattern:
            return {name: self.init_r for name in self.names}
        ranks = {}
        for key, mask in pattern.items():
            module = key.split(".lora_E")[0]
            if module not in self._cost and module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            ranks[module] = int(sum(bool(m) for m in mask))
        return {name: ranks.get(name, self.init_r) for name in self.names}

    def num_params(self):
        return sum(rank * self._cost[name] for name, rank in self.ranks().items())


def method_settings(name: str, settings: GardSettings) -> GardSettings:
    """The GardSettings method `name` runs with: the shared ones plus the method's overrides."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    overrides = METHODS[name].get("settings", {})
    return replace(settings, **overrides) if overrides else settings


def build_method(name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, steps: int) -> Method:
    """Wrap `model` (modified in place) with method `name` under `budget` LoRA parameters."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[name]
    if spec["kind"] == "gard":
        return GardMethod(name, model, budget, settings, seed, spec["mode"], spec["score"], steps)
    if spec["kind"] == "uniform":
        return UniformMethod(name, model, budget, settings, seed)
    return AdaLoraMethod(name, model, budget, settings, seed, steps)


def adapted_costs(model: nn.Module, target_modules: Sequence[str]) -> list[int]:
    """d_in + d_out of every target module of an unwrapped model, in model order."""
    costs = []
    for full in match_target_modules(model, list(target_modules)):
        weight = model.get_submodule(full).weight
        costs.append(int(weight.shape[0] + weight.shape[1]))
    return costs


def minimum_budget(name: str, costs: Sequence[int], settings: GardSettings) -> int:
    """Smallest budget at which method `name` adapts at least one module."""
    kind = METHODS[name]["kind"]
    if kind == "uniform":
        return min(costs)
    if kind == "adalora":
        return max(costs) + 1
    return max(min(costs), settings.r_min * sum(costs))
