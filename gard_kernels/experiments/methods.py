"""Every method of the comparison behind one interface, so they share one training loop.

GARD variants run through the GARD controller, each with its GARDConfig preset (METHODS); uniform
LoRA, GoRA and EVA use the same LoRA layers with capture off (no sketching, no overhead) at
ranks they choose before training; AdaLoRA is PEFT's implementation, its rank budget converted
from our parameter budget.

GARD options are GARDConfig's fields everywhere: a run's config is GARDConfig's defaults,
overridden by the method's preset, overridden by what the comparison sets for every GARD run
(GardSettings, e.g. from the command line). The method `gard` has an empty preset, so it runs
exactly GARDConfig's defaults.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import GARDConfig, default_r_max
from ..controller import GARD
from ..lora.layer import adapter_shape
from ..lora.manager import LoRAManager, match_target_modules

# GARDConfig's defaults before the study of docs/results.md chose the recommended ones. Every
# earlier method pins them, so its name still means the run it meant (and its finished runs
# keep their fingerprints).
EARLIER_DEFAULTS = {"mode": "dynamic", "score": "spectral", "window": 8, "grow_init": "zero", "r_max": 8}

# The settings of the first grids (docs/results.md) that differ from those defaults: the paper
# gives no window or interval, and these were the experiments' choice for short runs.
EARLIER_GRID = {"window": 4, "interval": 4}

# GoRA profiles this many batches (its finished runs used the earlier default window). The other
# baselines do not read it but resolve the same value, so every baseline shares one set of bounds.
# r_max: the earlier default, as for the earlier GARD methods; only `gard` scales it with the
# budget (GARDConfig.r_max). Set r_max (--r-max) to bound every method alike above average rank 2.
BASELINE_PRESET = {"window": 8, "r_max": 8}


def _gard(**fields: Any) -> dict[str, Any]:
    """An earlier GARD method: the earlier defaults, changed by `fields`."""
    return {"kind": "gard", "config": {**EARLIER_DEFAULTS, **fields}}


# Method name -> how it is built. "gard" kinds carry a GARDConfig preset (mode and score
# included); the other kinds read the shared bounds (target_modules, r_min, r_max, scaling)
# from the resolved GARD settings, so every method runs under the same bounds.
METHODS: dict[str, dict[str, Any]] = {
    # GARDConfig's defaults, exactly (the recommended configuration): change them there and
    # `gard` changes with them.
    "gard": {"kind": "gard", "config": {}},
    # The paper's score (energy effective rank of the window's Gram), §3.4 and §3.3.
    "gard-paper-dynamic": _gard(mode="dynamic", score="spectral", **EARLIER_GRID),
    "gard-paper-static": _gard(mode="static", score="spectral", **EARLIER_GRID),
    # Earlier names of the two paper methods, kept working (same presets).
    "gard-dynamic": _gard(mode="dynamic", score="spectral", **EARLIER_GRID),
    "gard-static": _gard(mode="static", score="spectral", **EARLIER_GRID),
    "uniform": {"kind": "uniform", "config": BASELINE_PRESET},
    "grad-norm": _gard(mode="dynamic", score="grad_norm", **EARLIER_GRID),
    "random": _gard(mode="dynamic", score="random", **EARLIER_GRID),
    # Added after the first grid (docs/results.md): the gradient-norm score beat the spectral one,
    # and a static profile beat the dynamic warm-up at rank 0 under the paper's tight budget.
    "grad-norm-static": _gard(mode="static", score="grad_norm", **EARLIER_GRID),
    # Scores from the same ring at no extra capture cost (GARDConfig.score documents each).
    "update-rank": _gard(mode="dynamic", score="update_rank", **EARLIER_GRID),
    "update-rank-static": _gard(mode="static", score="update_rank", **EARLIER_GRID),
    "update-nuclear": _gard(mode="dynamic", score="update_nuclear", **EARLIER_GRID),
    "update-nuclear-static": _gard(mode="static", score="update_nuclear", **EARLIER_GRID),
    "energy-rank": _gard(mode="dynamic", score="energy_rank", **EARLIER_GRID),
    "energy-rank-static": _gard(mode="static", score="energy_rank", **EARLIER_GRID),
    # GoRA's initialisation for the directions dynamic GARD grows (GARDConfig.grow_init).
    "gard-gora-init": _gard(mode="dynamic", grow_init="gora"),
    "grad-norm-gora-init": _gard(mode="dynamic", score="grad_norm", grow_init="gora", **EARLIER_GRID),
    # Static GARD whose re-initialisation at the allocation is GoRA's (one gradient step); the
    # second is the candidate the recommended defaults were taken from (same settings).
    "grad-norm-static-gora-init": _gard(mode="static", score="grad_norm", grow_init="gora", **EARLIER_GRID),
    "update-nuclear-static-gora-init": _gard(mode="static", score="update_nuclear", grow_init="gora", **EARLIER_GRID),
    "adalora": {"kind": "adalora", "config": BASELINE_PRESET},
    "gora": {"kind": "gora", "config": BASELINE_PRESET},
    "eva": {"kind": "eva", "config": BASELINE_PRESET},
}

# The GARDConfig fields the non-GARD methods read (their shared bounds; GoRA's profiling window).
BASELINE_OPTIONS = ("target_modules", "r_min", "r_max", "scaling", "window")

# Methods whose ranks come from the effective rank of gradient spectra: the ones the α / k / M
# ablation varies.
SPECTRAL_METHODS = tuple(
    name for name, spec in METHODS.items()
    if spec["kind"] == "gard" and spec["config"].get("score", GARDConfig.__dataclass_fields__["score"].default) == "spectral"
)

# Fields of GARDConfig fixed per run rather than per comparison.
_PER_RUN_FIELDS = ("budget", "seed")
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GARDConfig))


def config_default(name: str) -> Any:
    """GARDConfig's default of field `name`."""
    f = GARDConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class GardSettings:
    """GARDConfig fields a comparison sets for every GARD run (and the bounds of every method).

    Unset fields come from the method's preset, else from GARDConfig's defaults. `budget` and
    `seed` are per run and cannot be set here.

    Args:
        **overrides: GARDConfig field -> value, e.g. window=2, k_in=4, k_out=4, backend="torch".
    """

    def __init__(self, **overrides: Any):
        unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"unknown GARD option(s) {unknown}; GARDConfig has {', '.join(_CONFIG_FIELDS)}")
        fixed = sorted(set(overrides) & set(_PER_RUN_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} are set per run (budget, seed), not for a whole comparison")
        if isinstance(overrides.get("target_modules"), tuple):
            overrides["target_modules"] = list(overrides["target_modules"])
        self.overrides = dict(sorted(overrides.items()))

    def __repr__(self) -> str:
        return f"GardSettings({', '.join(f'{k}={v!r}' for k, v in self.overrides.items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GardSettings) and self.overrides == other.overrides

    def to_dict(self) -> dict:
        return dict(self.overrides)

    def replace(self, **changes: Any) -> "GardSettings":
        """A copy with some fields changed."""
        return GardSettings(**{**self.overrides, **changes})

    def options(self, method: str) -> dict[str, Any]:
        """Every GARDConfig field but budget and seed, as method `method` runs them."""
        preset = METHODS[method].get("config", {}) if method in METHODS else {}
        merged = {name: config_default(name) for name in _CONFIG_FIELDS if name not in _PER_RUN_FIELDS}
        merged.update(preset)
        merged.update(self.overrides)
        return merged

    def value(self, name: str, method: str = "gard") -> Any:
        """The resolved value of one field for method `method` (default: the `gard` method)."""
        return self.options(method)[name]

    def config(self, method: str, budget: int, seed: int = 0, steps: Optional[int] = None) -> GARDConfig:
        """The GARDConfig of one run of GARD method `method` (validated by GARDConfig).

        Dynamic runs of `steps` optimizer steps never re-allocate at the last step unless
        freeze_after is set: nothing would train the new ranks before the final evaluation.
        """
        options = self.options(method)
        if steps is not None and options.get("freeze_after") is None and options["mode"] == "dynamic":
            options["freeze_after"] = max(0, steps - 1)
        return GARDConfig(budget=budget, seed=seed, **options)

    def validate(self, methods: Sequence[str], budgets: Sequence[int]) -> None:
        """Build every GARD method's config once: a bad option fails here, before any model loads."""
        for method in methods:
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            for budget in budgets:
                if METHODS[method]["kind"] == "gard":
                    self.config(method, budget)
        # Non-GARD methods read the shared bounds: check those too.
        GARDConfig(budget=max(budgets) if budgets else 1, **{k: v for k, v in self.overrides.items()})


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
        """Before the first optimizer step (static GARD, GoRA and EVA look at data here)."""

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer.step() of step `step` (0-based), before zero_grad()."""

    def num_params(self) -> int:
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        raise NotImplementedError

    def backprop_modules(self) -> list[str]:
        """Adapted modules the next backward pass must reach: those with rank > 0 (GARD also
        reaches every capturing module, whatever its rank)."""
        return [name for name, rank in self.ranks().items() if rank > 0]


class GardMethod(Method):
    """GARD controller with the method's GARDConfig (see METHODS and GardSettings.config)."""

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, steps: int):
        self.name, self.model = name, model
        self.config = settings.config(name, budget, seed, steps)
        self.gard = GARD(model, self.config)
        # GARD's config: r_max=None resolved to the bound the run used.
        self.details = {"gard_config": self.gard.config.to_dict()}

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


class _FixedRankMethod(Method):
    """LoRA layers at ranks chosen before training, capture off (uniform, GoRA, EVA)."""

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int):
        self.name, self.model, self.budget = name, model, budget
        self.generator = torch.Generator().manual_seed(seed)
        self.manager = LoRAManager(model, settings.value("target_modules"), 0, settings.value("scaling"))
        self.r_min = settings.value("r_min")
        # The method's own bound (its preset pins the earlier 8; r_max=None scales with the budget).
        self.r_max = settings.value("r_max", name) or default_r_max(budget, self.manager.costs)

    def parameters(self):
        return self.manager.parameters()

    def num_params(self):
        return self.manager.num_params()

    def ranks(self):
        return dict(zip(self.manager.names, self.manager.ranks))


class UniformMethod(_FixedRankMethod):
    """Standard LoRA: one rank everywhere, through GARD's LoRA layers with capture off.

    The rank is the largest r <= r_max with r * Σ(d_in + d_out) <= budget (capped per layer at
    min(d_in, d_out)). When even rank 1 everywhere exceeds the budget, rank 1 goes to as many
    modules as fit, walking from the last module (deepest layer) towards the first and skipping
    a module whose unit no longer fits; the rest get rank 0.
    """

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int):
        super().__init__(name, model, budget, settings, seed)
        plan, fallback = uniform_ranks(self.manager.costs, self.manager.caps, budget, self.r_max)
        for layer, rank in zip(self.manager.layers, plan):
            layer.resize(rank, generator=self.generator)
        self.details = {"uniform_rank": max(plan), "last_layers_fallback": fallback, "plan": dict(zip(self.manager.names, plan))}


def uniform_ranks(costs: Sequence[int], caps: Sequence[int], budget: int, r_max: Optional[int] = None) -> tuple[list[int], bool]:
    """Uniform LoRA's ranks under a parameter budget and the rank bound r_max (see UniformMethod).

    Returns:
        (ranks, fallback): fallback is True when rank 1 everywhere did not fit.
    """
    rank = budget // sum(costs)
    if r_max is not None:
        rank = min(rank, r_max)
    if rank >= 1:
        return [min(rank, cap) for cap in caps], False
    ranks = [0] * len(costs)
    left = budget
    for i in reversed(range(len(costs))):
        if costs[i] <= left and caps[i] >= 1:
            ranks[i] = 1
            left -= costs[i]
    return ranks, True


def trim_to_budget(ranks: list[int], costs: Sequence[int], budget: int, excess: Sequence[float], r_min: int = 0) -> list[int]:
    """Lower ranks one unit at a time until Σ r c <= budget, always where `excess` (how far a
    layer's rank is above what it deserves) is largest; ties go to the costlier layer.

    Args:
        ranks: [L] ranks (a new list is returned).
        costs: [L] d_in + d_out.
        excess: [L] per-layer excess of its rank over its share (recomputed as ranks fall).
        r_min: no rank goes below it.
    """
    ranks = list(ranks)
    excess = list(excess)
    while sum(r * c for r, c in zip(ranks, costs)) > budget:
        candidates = [i for i, r in enumerate(ranks) if r > r_min]
        if not candidates:
            raise ValueError(f"budget {budget} is below r_min={r_min} on every layer")
        i = max(candidates, key=lambda j: (excess[j], costs[j], -j))
        ranks[i] -= 1
        excess[i] -= 1.0
    return ranks


def gora_ranks(importance: Sequence[float], costs: Sequence[int], caps: Sequence[int], budget: int, r_min: int, r_max: int) -> list[int]:
    """GoRA's allocation: r_l = round(B s_l / (d_in + d_out)), s = importance / Σ importance,
    clamped to [r_min, min(r_max, cap)], then lowered where rounding overshot until Σ r c <= B.

    Under a budget so tight that every share rounds to 0 (2,570 parameters over 60 SmolLM2
    modules: every B s_l / c_l < 0.5), the formula adapts nothing and GoRA could not train at
    all. Our extension for that case only: rank 1 goes to the most important layers, in order,
    while it fits (ties to the cheaper, then earlier layer). Otherwise the formula stands, and
    the budget it leaves unspent stays unspent, as in the paper.

    Args:
        importance: [L] non-negative layer importances (GoRA: mean |W ⊙ Ḡ|).
        costs: [L] d_in + d_out; caps: [L] min(d_in, d_out).
    """
    total = float(sum(importance))
    shares = [v / total if total > 0 else 1.0 / len(costs) for v in importance]
    exact = [budget * s / c for s, c in zip(shares, costs)]
    ranks = [max(r_min, min(r_max, cap, round(x))) for x, cap in zip(exact, caps)]
    ranks = trim_to_budget(ranks, costs, budget, [r - x for r, x in zip(ranks, exact)], r_min)
    if not any(ranks):
        spent = 0
        for i in sorted(range(len(costs)), key=lambda j: (-importance[j], costs[j], j)):
            if min(r_max, caps[i]) >= 1 and spent + costs[i] <= budget:
                ranks[i], spent = 1, spent + costs[i]
    return ranks


class GoraMethod(_FixedRankMethod):
    """GoRA (He et al., NeurIPS 2025, arXiv:2502.12171): gradient-driven ranks and initialisation.

    Profiling (forward / backward, no optimizer step) on the run's first `window` batches (the
    same batches and count static GARD profiles): Ḡ_l = mean gradient of each adapted weight.
    Importance I_l = mean |W_l ⊙ Ḡ_l|, s_l = I_l / Σ I; ranks by `gora_ranks` under the same
    Σ r (d_in + d_out) <= B budget and [r_min, r_max] bounds as every method. Initialisation: A
    random (PEFT's init), B from Ḡ through the pseudo-inverse of A,
        B = -(lr / sqrt(r / d_in)) / scaling * Ḡ A^T (A A^T)^-1,
    so scaling * B A = -lr / sqrt(r / d_in) * Ḡ P_A: one gradient-descent step of Ḡ projected on
    A's row space, scaled up by sqrt(d_in / r) for what the projection loses (the paper's
    learning-rate-scaled initialisation). Unlike LoRA, the adapted model differs from the base
    model before training, as in the paper (W is not modified).
    """

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, lr: float):
        super().__init__(name, model, budget, settings, seed)
        self.window = settings.value("window", name)
        self.lr = lr
        self.details = {"profile_batches": self.window, "init_lr": lr}

    def prepare(self, batches, loss_fn, progress=False):
        from tqdm.auto import tqdm

        if len(batches) < 1:
            raise ValueError("gora needs at least one batch to profile gradients")
        layers = self.manager.layers
        weights = [layer.base.weight for layer in layers]
        sums = [torch.zeros(layer.d_out, layer.d_in, dtype=torch.float64, device=w.device) for layer, w in zip(layers, weights)]
        used = batches[: self.window]
        for w in weights:
            w.requires_grad_(True)
        try:
            for batch in tqdm(used, desc="gora profiling", unit="batch", disable=not progress, leave=False):
                grads = torch.autograd.grad(loss_fn(self.model, batch), weights)
                for total, grad, layer in zip(sums, grads, layers):
                    # Linear weights are [d_out, d_in]; Conv1D ones [d_in, d_out] (also when square).
                    total += (grad if isinstance(layer.base, nn.Linear) else grad.T).double()
        finally:
            for w in weights:
                w.requires_grad_(False)
        means = [total / len(used) for total in sums]
        importance = []
        for layer, grad in zip(layers, means):
            w = layer.base.weight.detach().double()
            w = w if isinstance(layer.base, nn.Linear) else w.T
            importance.append(float((w * grad).abs().mean()))
        plan = gora_ranks(importance, self.manager.costs, self.manager.caps, self.budget, self.r_min, self.r_max)
        for layer, rank, grad in zip(layers, plan, means):
            layer.resize(rank, generator=self.generator)
            if rank:
                with torch.no_grad():
                    layer.lora_B.copy_(gora_init_b(layer.lora_A.detach(), grad, self.lr, layer.scaling).to(layer.lora_B.dtype))
        self.details.update({"importance": importance, "plan": dict(zip(self.manager.names, plan))})


def gora_init_b(a: torch.Tensor, grad: torch.Tensor, lr: float, scaling: float) -> torch.Tensor:
    """GoRA's B: -(lr / sqrt(r / d_in)) / scaling * Ḡ A^T (A A^T)^-1 (see GoraMethod).

    Args:
        a: [r, d_in] the layer's A. grad: [d_out, d_in] mean gradient Ḡ.
    Returns:
        [d_out, r] float64.
    """
    r, d_in = a.shape
    a = a.double()
    # pinv, not inv: A A^T of a random A is well conditioned, but this never divides by ~0.
    b = grad.double() @ a.T @ torch.linalg.pinv(a @ a.T)
    return -(lr / math.sqrt(r / d_in)) / scaling * b


class EvaMethod(_FixedRankMethod):
    """EVA (Paischer et al., 2024) through PEFT's `get_eva_state_dict`: A = top right-singular
    vectors of each layer's input activations, B = 0, ranks redistributed by explained variance.

    EVA budgets ranks: PEFT spreads Σ r_l units over the layers by explained variance, at most
    rho * r_l per layer (rho = 2, PEFT's default). The starting r_l are uniform LoRA's ranks
    under the same budget and bounds (so at tight budgets only uniform's modules take part).
    Moving a unit between modules of different d_in + d_out changes the parameter count, so
    units are then removed (the layer's least-variance component first, from the layer furthest
    above its starting rank) until the count is within the budget; metrics report the real count.
    The run's batches, in order, feed PEFT's incremental SVD until its convergence test passes
    (cycled if it needs more); it reads activations only (forward passes, no gradients).
    """

    RHO = 2.0

    def __init__(self, name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int):
        super().__init__(name, model, budget, settings, seed)
        self.plan, _ = uniform_ranks(self.manager.costs, self.manager.caps, budget, self.r_max)
        self.details = {"rho": self.RHO, "start_ranks": dict(zip(self.manager.names, self.plan))}

    def prepare(self, batches, loss_fn, progress=False):
        from peft import EvaConfig, LoraConfig
        from peft.tuners.lora.eva import get_eva_state_dict

        targets = {f"{name}.base": rank for name, rank in zip(self.manager.names, self.plan) if rank > 0}
        config = LoraConfig(
            r=max(targets.values()),
            target_modules=list(targets),
            rank_pattern=dict(targets),
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=self.RHO),
        )
        # The run's batches in order: PEFT's incremental SVD stops at convergence, and fresh
        # batches (rather than the first M cycled) let it converge on the data, not on repeats.
        device = next(self.model.parameters()).device
        loader = [{"input_ids": batch.to(device)} for batch in batches]
        with torch.no_grad():
            state = get_eva_state_dict(self.model, loader, peft_config=config, show_progress_bar=progress)
        components = [state.get(f"{name}.base") for name in self.manager.names]
        eva = [0 if u is None else int(u.shape[0]) for u in components]
        caps = [min(r, self.r_max, cap) for r, cap in zip(eva, self.manager.caps)]
        final = trim_to_budget(caps, self.manager.costs, self.budget, [r - p for r, p in zip(caps, self.plan)], 0)
        for layer, rank, u in zip(self.manager.layers, final, components):
            layer.resize(rank, generator=self.generator)
            if rank:
                with torch.no_grad():
                    layer.lora_A.copy_(u[:rank].to(layer.lora_A.dtype))
        self.details.update({"eva_ranks": dict(zip(self.manager.names, eva)), "plan": dict(zip(self.manager.names, final))})


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
        target_modules = settings.value("target_modules")
        scaling = settings.value("scaling")
        names = match_target_modules(model, target_modules)
        shapes = {}
        for full in names:
            shapes[full] = adapter_shape(model.get_submodule(full))
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
            target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
            init_r=init_r,
            target_r=1,
            lora_alpha=scaling * init_r,
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
            "lora_alpha": scaling * init_r,
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

    def backprop_modules(self):
        # Masked triplets still sit in the graph: backward reaches every adapted module.
        return list(self.names)

    def num_params(self):
        return sum(rank * self._cost[name] for name, rank in self.ranks().items())


def build_method(name: str, model: nn.Module, budget: int, settings: GardSettings, seed: int, steps: int, lr: float) -> Method:
    """Wrap `model` (modified in place) with method `name` under `budget` LoRA parameters.

    Args:
        lr: the run's learning rate (GoRA's initialisation is one gradient step of this size).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    kind = METHODS[name]["kind"]
    if kind == "gard":
        return GardMethod(name, model, budget, settings, seed, steps)
    if kind == "uniform":
        return UniformMethod(name, model, budget, settings, seed)
    if kind == "gora":
        return GoraMethod(name, model, budget, settings, seed, lr)
    if kind == "eva":
        return EvaMethod(name, model, budget, settings, seed)
    return AdaLoraMethod(name, model, budget, settings, seed, steps)


def adapted_costs(model: nn.Module, target_modules: Sequence[str]) -> list[int]:
    """d_in + d_out of every target module of an unwrapped model, in model order."""
    return [sum(adapter_shape(model.get_submodule(full))) for full in match_target_modules(model, target_modules)]


def minimum_budget(name: str, costs: Sequence[int], settings: GardSettings) -> int:
    """Smallest budget at which method `name` adapts at least one module."""
    kind = METHODS[name]["kind"]
    if kind in ("uniform", "gora", "eva"):
        return min(costs)
    if kind == "adalora":
        return max(costs) + 1
    return max(min(costs), settings.value("r_min", name) * sum(costs))


def block_index(module_name: str) -> Optional[int]:
    """Transformer block of an adapted module: the last integer in its name (None: none)."""
    digits = [part for part in module_name.split(".") if part.isdigit()]
    return int(digits[-1]) if digits else None
