"""The method registry: every name `gard compare` accepts and how each is built.

GARD methods carry a GARDConfig preset (mode and score included); a run's config is GARDConfig's
defaults, overridden by the preset, overridden by what the comparison sets for every GARD run
(settings.GardSettings). The method `gard` has an empty preset, so it runs exactly GARDConfig's
defaults. Baselines (baselines/) share the bounds of the GARD settings and their registry lists
them; each name below is a key of `METHODS` (shown in `gard compare --help`) or of
`LEGACY_METHODS` (earlier names, still accepted so old runs and commands keep working).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..config import GARDConfig
from .baselines import BASELINES
from .gard_method import GardMethod
from .method import Method, MethodRun

# GARDConfig's defaults before the study of docs/results.md chose the recommended ones. Every
# earlier method pins them, so its name still means the run it meant (and its finished runs
# keep their fingerprints).
EARLIER_DEFAULTS = {
    "mode": "dynamic", "score": "spectral", "window": 8, "grow_init": "zero", "r_max": 8, "scaling_rule": "constant",
}

# The settings of the first grids (docs/results.md) that differ from those defaults: the paper
# gives no window or interval, and these were the experiments' choice for short runs.
EARLIER_GRID = {"window": 4, "interval": 4}

# GoRA profiles this many batches (its finished runs used the earlier default window). The other
# baselines do not read it but resolve the same value, so every baseline shares one set of bounds.
# r_max: the earlier default, as for the earlier GARD methods; only `gard` scales it with the
# budget (GARDConfig.r_max). Set r_max (--r-max) to bound every method alike above average rank 2.
BASELINE_PRESET = {"window": 8, "r_max": 8}

# The GARDConfig fields a method's name sets (`gard-paper-static` is static + spectral): not
# options of a comparison.
METHOD_FIELDS = ("mode", "score")

# The GARDConfig fields the non-GARD methods read (their shared bounds; GoRA's profiling window).
BASELINE_OPTIONS = ("target_modules", "r_min", "r_max", "scaling", "window")


def _gard(**fields: Any) -> dict[str, Any]:
    """An earlier GARD method: the earlier defaults, changed by `fields`."""
    return {"kind": "gard", "config": {**EARLIER_DEFAULTS, **fields}}


def _candidate(**fields: Any) -> dict[str, Any]:
    """A static GARD candidate of the all-linear study: profile of 4 steps, `fields` on top."""
    return {"kind": "gard", "config": {"mode": "static", "window": 4, **fields}}


def _paper(mode: str) -> dict[str, Any]:
    """The paper's score (energy effective rank of the window's Gram), §3.4 (dynamic) and §3.3 (static)."""
    return _gard(mode=mode, score="spectral", **EARLIER_GRID)


# Method name -> how it is built, in the order tables and figures list them.
METHODS: dict[str, dict[str, Any]] = {
    # GARDConfig's defaults, exactly (the recommended configuration): change them there and
    # `gard` changes with them.
    "gard": {"kind": "gard", "config": {}},
    "gard-paper-dynamic": _paper("dynamic"),
    "gard-paper-static": _paper("static"),
    # The selection candidates of docs/results.md. After the first grid the gradient-norm score
    # beat the spectral one, and a static profile beat the dynamic warm-up at rank 0 under the
    # paper's tight budget.
    "grad-norm": _gard(mode="dynamic", score="grad_norm", **EARLIER_GRID),
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
    "random": _gard(mode="dynamic", score="random", **EARLIER_GRID),
    # Static GARD whose re-initialisation at the allocation is GoRA's (one gradient step); the
    # second is the candidate the recommended defaults were taken from (same settings).
    "grad-norm-static-gora-init": _gard(mode="static", score="grad_norm", grow_init="gora", **EARLIER_GRID),
    "update-nuclear-static-gora-init": _gard(mode="static", score="update_nuclear", grow_init="gora", **EARLIER_GRID),
    # The all-linear study's selection candidates (docs/results.md), every choice pinned so a
    # later change of GARDConfig's defaults leaves their meaning alone: marginal-gain allocation
    # (per rank unit, from the profile's cross-fitted singular values) against the current
    # default's proportional nuclear-norm shares, each with a rank-dependent scale (rsLoRA) and
    # the start from B = 0 or from GoRA's step checked on the profile ("gora_safe").
    "gard-marginal": _candidate(score="marginal_gain", grow_init="zero", scaling_rule="constant"),
    "gard-marginal-rslora": _candidate(score="marginal_gain", grow_init="zero", scaling_rule="rslora"),
    "gard-marginal-rslora-safe": _candidate(score="marginal_gain", grow_init="gora_safe", scaling_rule="rslora"),
    # GoRA's step from the mean gradient of the profile (GoRA's own Ḡ) rather than its last batch,
    # and A along the gradient's top directions without the step (B = 0).
    "gard-marginal-rslora-mean": _candidate(score="marginal_gain", grow_init="gora_mean", scaling_rule="rslora"),
    "gard-marginal-rslora-gradient": _candidate(score="marginal_gain", grow_init="gradient", scaling_rule="rslora"),
    # gard's start with the step's size searched on the profile (GoRA's adaptive step, not capped
    # at the learning rate's): faithful GoRA's edge at the q/v study's budgets.
    "gard-marginal-rslora-search": _candidate(score="marginal_gain", grow_init="gora_search", scaling_rule="rslora"),
    "gard-marginal-sq-rslora": _candidate(score="marginal_gain_sq", grow_init="zero", scaling_rule="rslora"),
    "gard-nuclear-rslora": _candidate(score="update_nuclear", grow_init="zero", scaling_rule="rslora"),
    **{name: {"kind": name, "config": BASELINE_PRESET} for name in BASELINES},
    # The all-linear study's baselines at their best (docs/results.md): GoRA as its official
    # code runs it (budget spent, its own adaptive step, rank-stabilised scaling), and AdaLoRA
    # with PEFT's usual target rank, pruned to the parameter budget (baselines/*.py).
    "gora-faithful": {"kind": "gora", "config": BASELINE_PRESET, "options": {"fill": True, "xi": "adaptive", "rank_scaling": "rslora"}},
    "adalora-params": {"kind": "adalora", "config": BASELINE_PRESET, "options": {"parameter_budget": True}},
    # A diagnostic (docs/results.md): static GoRA initialisation on AdaLoRA's final rank pattern
    # from the q/v study (its runs at 3e-2, the rate chosen for it at every budget), same budget
    # and seed, so only the ranks' origin differs from `gora`.
    "gora-on-adalora-ranks": {
        "kind": "gora",
        "config": BASELINE_PRESET,
        "options": {"ranks_from": "docs/metrics/study-*/adalora_b{budget}_s{seed}_lr0.03/metrics.json"},
    },
    # The same diagnostic for faithful GoRA against `gard` at the q/v study's middle budget: its
    # start (A random, B from the mean gradient, adaptive step) on gard's final ranks there (its
    # runs at 1e-2, the rate chosen for it at 14,400), so only the start differs from `gard`.
    "gora-faithful-on-gard-ranks": {
        "kind": "gora",
        "config": BASELINE_PRESET,
        "options": {"xi": "adaptive", "rank_scaling": "rslora",
                    "ranks_from": "docs/metrics/study-*/gard-marginal-rslora-safe_b{budget}_s{seed}_lr0.01/metrics.json"},
    },
}

# Earlier names of the two paper methods: accepted everywhere, listed nowhere.
LEGACY_METHODS: dict[str, dict[str, Any]] = {
    "gard-dynamic": METHODS["gard-paper-dynamic"],
    "gard-static": METHODS["gard-paper-static"],
}

# Method kind -> the Method subclass that builds it.
KINDS: dict[str, type[Method]] = {"gard": GardMethod, **BASELINES}

# Methods whose ranks come from the effective rank of gradient spectra: the ones the α / k / M
# ablation varies.
SPECTRAL_METHODS = tuple(
    name for name, spec in {**METHODS, **LEGACY_METHODS}.items()
    if spec["kind"] == "gard" and spec["config"].get("score", GARDConfig.__dataclass_fields__["score"].default) == "spectral"
)


def method_spec(name: str) -> dict[str, Any]:
    """The registry entry of method `name` (a listed or a legacy name).

    Raises:
        ValueError: an unknown name; the message lists the methods to choose from.
    """
    spec = METHODS.get(name) or LEGACY_METHODS.get(name)
    if spec is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return spec


def method_options(name: str) -> dict[str, Any]:
    """The method's own hyperparameters (its registry entry's "options"; {} for most methods).
    They are part of the run's fingerprint only when not empty, so older runs keep theirs."""
    return dict(method_spec(name).get("options", {}))


def is_method(name: str) -> bool:
    """Whether `name` is a listed or a legacy method."""
    return name in METHODS or name in LEGACY_METHODS


def method_kind(name: str) -> str:
    """The kind of method `name`: "gard", or the baseline that builds it (ValueError when unknown)."""
    return method_spec(name)["kind"]


def method_order(name: str) -> tuple[int, str]:
    """Sort key of tables and figures: registry order, legacy names after, unknown names last."""
    order = [*METHODS, *LEGACY_METHODS]
    return (order.index(name) if name in order else len(order), name)


def build_method(run: MethodRun) -> Method:
    """Wrap run.model (modified in place) with method run.name under run.budget LoRA parameters."""
    return KINDS[method_kind(run.name)](run)


def minimum_budget(name: str, costs: Sequence[int], settings) -> int:
    """Smallest budget at which method `name` adapts at least one module of costs [L] d_in + d_out."""
    return KINDS[method_kind(name)].minimum_budget(costs, settings, name, method_options(name))
