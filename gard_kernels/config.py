"""GARDConfig: every knob of the controller, documented once and validated on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .lora import layer as _layer
from .lora.scaling import SCALING_RULES
from .marginal_gain import GAIN_SCORES
from .scores import LAYER_SCORES
from .sketch.dispatch import ALL_BACKENDS, BACKEND_CHOICES
from .spectra import MEASURES

MODES = ("static", "dynamic")
SCORES = (*LAYER_SCORES, *GAIN_SCORES)
SHRINKS = ("norm", "svd")
# The score each mode runs when none is set: the all-linear study's choice for static mode (it
# needs gard.profile), and the best layer score that dynamic mode can re-allocate from.
DEFAULT_SCORES = {"static": "marginal_gain", "dynamic": "update_nuclear"}
# The start of new directions when none is set: GoRA's step checked on the profile batches
# (static mode, with gard.profile), and B = 0 where no profile checks it (GoRA's unchecked step
# cost 1 PPL at all-linear average rank 8, docs/results.md).
DEFAULT_GROW_INITS = {"static": "gora_safe", "dynamic": "zero"}

# The layer's grow inits, and GoRA's step checked on the profile batches: from the last batch's
# gradient ("gora_safe"; its size searched, not capped at the learning rate's: "gora_search") or
# from the mean gradient of the others ("gora_mean").
CHECKED_GROW_INITS = ("gora_safe", "gora_mean", "gora_search")
GROW_INITS = (*_layer.GROW_INITS, *CHECKED_GROW_INITS)


@dataclass
class GARDConfig:
    """Configuration of a GARD run; each field's help is its metadata["help"] (what `gard
    --help` shows), the paper's symbol, where it has one, its metadata["symbol"].

    The defaults are the recommended configuration, chosen on validation in the all-linear study of
    docs/results.md (seven projections, average rank 8): a static profile of 4 batches
    (gard.profile), ranks granted unit by unit by marginal gain (the singular values of each
    layer's mean gradient, from a cross-fitted randomized SVD, per parameter the unit costs), a
    rank-stabilised scale (rsLoRA's alpha / sqrt(r), equal to `scaling` at the average rank), and
    adapters that start at GoRA's projected gradient step, kept only as far as it does not raise
    the loss on the profile batches ("gora_safe"; attach the optimizer before the profile). The
    recommendation before that study was score="update_nuclear", grow_init="gora",
    scaling_rule="constant" (profiled inside the training loop); the paper's configuration is
    mode="dynamic" (or "static"), score="spectral", grow_init="zero", scaling_rule="constant".
    """

    budget: int = field(metadata={"help": (
        "global LoRA parameter budget B; sum over layers of r * (d_in + d_out) never exceeds it")})
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": (
        "which Linear / Conv1D modules get adapters. A list of names or name suffixes (PEFT style: "
        '"q_proj" matches "model.layers.0.self_attn.q_proj"), PEFT\'s "all-linear" (every Linear / Conv1D '
        "of a transformers model except its output layer, model.get_output_embeddings()), or any other "
        "string, a regular expression matched against full module names (re.fullmatch).")})
    mode: str = field(default="static", metadata={"help": (
        '"static" profiles `window` steps, allocates once and re-initialises the adapters (paper §3.3); '
        '"dynamic" re-allocates every `interval` steps after `warmup` (§3.4).')})
    r_min: int = field(default=0, metadata={"help": "smallest rank of any layer (0 lets a layer drop out entirely)"})
    r_max: Optional[int] = field(default=None, metadata={"help": (
        "largest rank of any layer (also capped at min(d_in, d_out) per layer). None (the default) scales "
        "with the budget: max(8, 4 x the average rank the budget allows, budget // sum(d_in + d_out) over the "
        "target layers), resolved when GARD is built and shown in `gard.config` (8 at the small q/v budgets "
        "of docs/results.md; 32 at all-linear average rank 8)")})
    r_init: Optional[int] = field(default=None, metadata={"help": (
        "provisional rank of every layer while profiling; None takes the largest uniform rank within the "
        "budget and [r_min, r_max] (0 under tight budgets: rank-0 layers are still profiled)")})
    window: int = field(default=4, metadata={"symbol": "M", "help": (
        "the number of per-step sketches per layer a score is computed from (static mode: the profiling steps)")})
    min_valid_steps: Optional[int] = field(default=None, metadata={"fingerprint_omit": None, "help": (
        "fewest steps of a window with finite gradients that an allocation is made from; None: "
        "max(2, window // 2) (at most the steps the window holds). Below it, profile() and static mode's "
        "allocation raise, and dynamic mode skips that re-allocation with a warning (NaN / Inf losses give "
        "no gradient information).")})
    k_in: int = field(default=16, metadata={"help": "sketch columns on the input side; the sketch of one step has k_in * k_out entries"})
    k_out: int = field(default=16, metadata={"help": "sketch rows on the output side"})
    alpha: float = field(default=0.9, metadata={"symbol": "α", "help": "energy threshold of the effective rank, in (0, 1)"})
    measure: str = field(default="energy", metadata={"help": (
        'effective-rank measure: "energy" (the paper), "entropy", "stable", "participation"')})
    score: Optional[str] = field(default=None, metadata={"help": (
        'None (the default): "marginal_gain" in static mode, "update_nuclear" in dynamic mode (DEFAULT_SCORES). '
        'Layer importance: "spectral" (effective rank, the paper), "grad_norm" (gradient Frobenius norm '
        'estimated from the same sketches), "uniform", or "random" (baselines); from the same window at no '
        'extra capture cost: "update_rank" (effective rank, by `measure` and `alpha`, of the summed sketch '
        'S = Σ_b S_b: how many directions the update itself has), "update_nuclear" (nuclear norm of S / valid '
        'steps: magnitude and diversity of the mean update), "energy_rank" (gradient norm × the paper\'s '
        "effective rank of the Gram: magnitude weighted by diversity). Each is a function of "
        "scores.LAYER_SCORES, allocated in proportion (allocate.allocate_ranks). Per rank unit instead, static "
        'mode only: "marginal_gain" (unit j of layer l is worth g_{l,j} / (d_in + d_out), g_{l,j} the j-th '
        "singular value of the layer's mean gradient over the profile, from a randomized SVD with r_max + 8 "
        "columns and one power step, cross-fitted between the profile's halves so that noise is worth ~0; the "
        'best units are granted until the budget is spent, marginal_gain.allocate_marginal) and '
        '"marginal_gain_sq" (g squared, the ablation). They need gard.profile(batches), which then runs three '
        "forward/backward passes over the same `window` batches (lora/gain_probe.py).")})
    interval: int = field(default=20, metadata={"symbol": "τ", "help": "steps between re-allocations in dynamic mode"})
    ema: float = field(default=0.7, metadata={"symbol": "β", "help": "smoothing of effective ranks across re-allocations, in [0, 1)"})
    delta_max: int = field(default=2, metadata={"symbol": "Δmax", "help": (
        "largest rank change of one layer at one re-allocation (dynamic mode)")})
    dead_band: float = field(default=0.25, metadata={"help": (
        "hysteresis of dynamic re-allocations, >= 0: a unit of rank leaves the layer that holds it only for a "
        "layer whose score per unit is more than (1 + dead_band) times higher; exact ties keep the current "
        "ranks. 0.25 absorbs the window-to-window noise of effective ranks (flat spectra sit at M-1 or M); 0 "
        "keeps only the tie rule. Not used by the first allocation, which ties to the current ranks but moves "
        "freely from the provisional r_init.")})
    warmup: Optional[int] = field(default=None, metadata={"help": "steps before the first dynamic re-allocation; None uses `window`"})
    freeze_after: Optional[int] = field(default=None, metadata={"help": (
        'dynamic mode stops re-allocating after this step ("early-dynamic"); None never')})
    grow_init: Optional[str] = field(default=None, metadata={"help": (
        'None (the default): "gora_safe" in static mode, "zero" in dynamic mode (DEFAULT_GROW_INITS). '
        'New directions start with B = 0 and A random ("zero") or A along the top singular directions of the '
        'current weight gradient ("gradient"), or with those A rows and B taking one gradient step of the '
        'optimizer\'s lr along them ("gora": GoRA\'s initialisation, He et al. 2025, for grown directions; this '
        "changes the output). Static mode's re-initialisation at the allocation follows it too. \"gora_safe\" "
        "(static mode, with gard.profile): GoRA's step, then halved (up to 6 times, else dropped: B = 0) until "
        "the mean loss over the profile batches but the last (the one the gradient came from) is no higher "
        "than with B = 0, so it can never start worse than \"gradient\" does; the allocation record holds the "
        'factor kept ("init_step_scale"). "gora_mean" (static mode, with gard.profile): the same, but the '
        "directions and the step come from the mean gradient of the profile batches but the first (GoRA's own "
        "mean over its profile), and the check runs on the first. \"gora_search\" (static mode, with gard.profile): "
        "gora_safe's directions and check, but the step's size is searched rather than capped at the learning "
        "rate's: each layer's step sqrt(d_in / r) * lambda for lambda = 4, 2, 1, ..., 2^-10 whatever the learning "
        "rate (GoRA's adaptive step, He et al. 2025), the lambda with the lowest loss on those batches kept "
        '(B = 0 if none is below it; the record holds "init_step_lambda").')})
    shrink: str = field(default="norm", metadata={"help": (
        'which directions a shrinking layer keeps: largest ||a_i|| * ||b_i|| ("norm") or the best rank-r '
        'approximation of the current update ("svd")')})
    scaling: float = field(default=2.0, metadata={"help": (
        "factor of the LoRA branch, y = W x + scale(r) * B A x, with scale(r) = scaling at the reference rank "
        "(see scaling_rule); PEFT's lora_alpha = scale(r) * r per layer.")})
    scaling_rule: str = field(default="rslora", metadata={"fingerprint_omit": "constant", "help": (
        'how the scale depends on a layer\'s rank r: scale(r) = scaling * (r_ref / r)^p with p = 0 ("constant": '
        'a resize never rescales what was learned), 1/2 ("rslora", rank-stabilised) or 1 ("linear", PEFT\'s '
        "alpha / r), r_ref = budget / Σ(d_in + d_out), the average rank the budget allows (uniform LoRA at "
        "that rank is the same under every rule; of a budget r_max cannot spend, only what it can counts). "
        "A resize under a rank-dependent rule rescales B (and its optimizer state) so that the layer's "
        "output does not change.")})
    seed: int = field(default=0, metadata={"help": (
        "run seed; per-layer projection seeds, adapter inits and random scores derive from it")})
    backend: str = field(default="auto", metadata={"help": (
        'sketch backend used during capture: "auto" measures and picks the fastest usable one, or one of '
        f"{', '.join(ALL_BACKENDS)}")})

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"GARDConfig: {message}")

        if self.score is None and self.mode in DEFAULT_SCORES:
            self.score = DEFAULT_SCORES[self.mode]
        if self.grow_init is None and self.mode in DEFAULT_GROW_INITS:
            self.grow_init = DEFAULT_GROW_INITS[self.mode]

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            # A string or None would otherwise fail the range checks below with a TypeError.
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        require(is_int(self.budget) and self.budget > 0, f"budget must be a positive int, got {self.budget!r}")
        if isinstance(self.target_modules, str):
            require(bool(self.target_modules), "target_modules must not be empty")
        else:
            self.target_modules = list(self.target_modules)
            require(
                bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
                f'target_modules must be "all-linear", a regex string or a non-empty list of names, '
                f"got {self.target_modules!r}",
            )
        for name, choices in (
            ("mode", MODES),
            ("score", SCORES),
            ("measure", MEASURES),
            ("grow_init", GROW_INITS),
            ("shrink", SHRINKS),
            ("backend", BACKEND_CHOICES),
            ("scaling_rule", tuple(SCALING_RULES)),
        ):
            value = getattr(self, name)
            require(value in choices, f"{name} must be one of {choices}, got {value!r}")
        require(
            self.score not in GAIN_SCORES or self.mode == "static",
            f"score={self.score!r} allocates once, from passes over the profile batches (gard.profile): "
            f"use mode='static', or a layer score ({', '.join(LAYER_SCORES)}) for mode='dynamic'",
        )
        require(
            self.grow_init not in CHECKED_GROW_INITS or self.mode == "static",
            f"grow_init={self.grow_init!r} checks GoRA's step on the profile batches (gard.profile), which dynamic "
            "re-allocations do not have: use mode='static', or grow_init='gora' / 'gradient' for mode='dynamic'",
        )
        require(is_int(self.r_min) and self.r_min >= 0, f"r_min must be an int >= 0, got {self.r_min!r}")
        if self.r_max is not None:
            require(
                is_int(self.r_max) and self.r_max >= max(self.r_min, 1),
                f"r_max must be an int >= max(r_min, 1), or None to scale it with the budget; got r_max={self.r_max!r}, "
                f"r_min={self.r_min}",
            )
        if self.r_init is not None:
            upper = "r_max" if self.r_max is None else self.r_max
            require(
                is_int(self.r_init) and self.r_min <= self.r_init and (self.r_max is None or self.r_init <= self.r_max),
                f"r_init must be None or an int in [r_min, r_max] = [{self.r_min}, {upper}], got {self.r_init!r}",
            )
        require(is_int(self.window) and self.window >= 2, f"window must be an int >= 2, got {self.window!r}")
        if self.min_valid_steps is not None:
            require(
                is_int(self.min_valid_steps) and 2 <= self.min_valid_steps <= self.window,
                f"min_valid_steps must be None or an int in [2, window] = [2, {self.window}], got {self.min_valid_steps!r}",
            )
        for name in ("k_in", "k_out"):
            value = getattr(self, name)
            require(is_int(value) and value > 0, f"{name} must be a positive int, got {value!r}")
        require(is_number(self.alpha) and 0.0 < self.alpha < 1.0, f"alpha must be in (0, 1), got {self.alpha!r}")
        require(is_int(self.interval) and self.interval >= 1, f"interval must be an int >= 1, got {self.interval!r}")
        require(is_number(self.ema) and 0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema!r}")
        require(is_int(self.delta_max) and self.delta_max >= 1, f"delta_max must be an int >= 1, got {self.delta_max!r}")
        require(
            isinstance(self.dead_band, (int, float)) and not isinstance(self.dead_band, bool)
            and 0.0 <= self.dead_band < float("inf"),
            f"dead_band must be a finite number >= 0 (0.25 is the default, 0 only breaks ties), got {self.dead_band!r}",
        )
        if self.warmup is not None:
            require(is_int(self.warmup) and self.warmup >= 0, f"warmup must be None or an int >= 0, got {self.warmup!r}")
        if self.freeze_after is not None:
            require(
                is_int(self.freeze_after) and self.freeze_after >= 0,
                f"freeze_after must be None or an int >= 0, got {self.freeze_after!r}",
            )
        require(is_number(self.scaling) and self.scaling > 0, f"scaling must be positive, got {self.scaling!r}")
        require(is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def layer_grow_init(self) -> str:
        """The grow_init LoRALayer.resize runs (CHECKED_GROW_INITS grow as "gora" and are checked afterwards)."""
        return "gora" if self.grow_init in CHECKED_GROW_INITS else self.grow_init

    @property
    def warmup_steps(self) -> int:
        """Steps before the first dynamic re-allocation."""
        return self.window if self.warmup is None else self.warmup

    def required_valid_steps(self, filled: int) -> int:
        """Fewest finite steps an allocation needs from a window that holds `filled` closed steps."""
        wanted = self.min_valid_steps if self.min_valid_steps is not None else max(2, self.window // 2)
        return max(2, min(wanted, filled))

    def with_resolved_r_max(self, costs: Sequence[int]) -> "GARDConfig":
        """This config with r_max=None replaced by its budget-scaled value (see `r_max`); itself otherwise.

        Args:
            costs: d_in + d_out of every target layer.
        """
        if self.r_max is not None:
            return self
        return dataclasses.replace(self, r_max=default_r_max(self.budget, costs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# r_max=None resolves to max(R_MAX_FLOOR, R_MAX_PER_AVERAGE x the budget's average rank): the
# all-linear study bounds ranks to [0, 4 x average]; the floor keeps r_max 8 at the q/v budgets.
R_MAX_FLOOR = 8
R_MAX_PER_AVERAGE = 4


def default_r_max(budget: int, costs: Sequence[int]) -> int:
    """max(8, 4 x budget / sum(costs)), rounded down: the rank bound r_max=None stands for.

    Args:
        budget: LoRA parameter budget.
        costs: d_in + d_out of every target layer (non-empty).
    """
    return max(R_MAX_FLOOR, R_MAX_PER_AVERAGE * budget // sum(costs))


def fingerprint_omissions() -> dict[str, Any]:
    """Fields added after experiment runs were committed -> the value that is the earlier
    behaviour (`metadata["fingerprint_omit"]`). A run's fingerprint leaves such a field out at
    that value (experiments/io.py), so the committed runs keep theirs whatever the default is now."""
    return {f.name: f.metadata["fingerprint_omit"] for f in dataclasses.fields(GARDConfig) if "fingerprint_omit" in f.metadata}
