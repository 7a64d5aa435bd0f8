"""What a comparison sets for all of its runs: training settings and GARD settings.

TrainSettings holds the training loop's and evaluation's settings (every method shares them);
GardSettings holds the GARDConfig fields set for every GARD run, which are also the bounds every
baseline runs under. Each TrainSettings field documents itself once, in its metadata["help"].
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ..config import DEFAULT_GROW_INITS, DEFAULT_SCORES, GARDConfig
from .presets import method_kind, method_spec

PRECISIONS = ("fp32", "bf16")

# Fields of GARDConfig fixed per run rather than per comparison.
PER_RUN_FIELDS = ("budget", "seed")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GARDConfig))


class SettingError(ValueError):
    """A setting out of range; `name` is the field, the message starts with it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name = name


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainSettings:
    """Training and evaluation settings shared by every method of a comparison (each field's
    help is its metadata["help"]; `gard --help` shows it)."""

    lr: float = field(default=1e-2, metadata={"help": (
        "AdamW learning rate (peak), the same for every method of a grid (a sweep varies it). 1e-2 is the rate "
        "the study chose on validation for the recommended `gard` at every budget (docs/results.md); the "
        "earlier grids used 3e-3.")})
    batch_size: int = field(default=4, metadata={"help": "blocks per optimizer step"})
    steps: int = field(default=100, metadata={"help": "optimizer steps (>= 100 for the study: docs/results.md)"})
    max_len: int = field(default=128, metadata={"help": "tokens per block"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warm-up (at least one step)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global norm of the adapter gradients (0: off)"})
    eval_blocks: Optional[int] = field(default=64, metadata={"help": (
        "validation blocks evaluated (round-robin over topics); None: all")})
    eval_batch_size: int = field(default=8, metadata={"help": "blocks per evaluation forward pass"})
    eval_every: int = field(default=0, metadata={"help": (
        "also evaluate every this many steps (0: only at the end); the best evaluation is the run's primary metric")})
    test_blocks: Optional[int] = field(default=64, metadata={"help": (
        "test blocks evaluated once, on the final model (round-robin over topics); None: all; 0: no test evaluation")})
    precision: str = field(default="fp32", metadata={"help": (
        "the training step's precision: fp32, or bf16 (forward under CPU / CUDA bf16 autocast, adapters and "
        "optimizer state in float32). Evaluation always runs in float32, so perplexities of both modes are "
        "measured the same way.")})
    compile: bool = field(default=False, metadata={"help": (
        "run the training forward through torch.compile (evaluation stays eager)")})

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise SettingError(name, f"must be {rule}, got {getattr(self, name)!r}")

        require(_is_number(self.lr) and self.lr > 0, "lr", "positive")
        for name, low in (("batch_size", 1), ("steps", 1), ("max_len", 2), ("eval_batch_size", 1), ("eval_every", 0)):
            require(_is_int(getattr(self, name)) and getattr(self, name) >= low, name, f">= {low} (an int)")
        require(_is_number(self.warmup_ratio) and 0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", "in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            require(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, ">= 0")
        require(self.eval_blocks is None or (_is_int(self.eval_blocks) and self.eval_blocks >= 1),
                "eval_blocks", "None (all) or an int >= 1")
        require(self.test_blocks is None or (_is_int(self.test_blocks) and self.test_blocks >= 0),
                "test_blocks", "None (all) or an int >= 0")
        require(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        require(isinstance(self.compile, bool), "compile", "True or False")

    def to_dict(self) -> dict:
        return asdict(self)


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
        unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"unknown GARD option(s) {unknown}; GARDConfig has {', '.join(CONFIG_FIELDS)}")
        fixed = sorted(set(overrides) & set(PER_RUN_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} are set per run ({', '.join(PER_RUN_FIELDS)}), not for a whole comparison")
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
        preset = method_spec(method).get("config", {})
        merged = {name: config_default(name) for name in CONFIG_FIELDS if name not in PER_RUN_FIELDS}
        merged.update(preset)
        merged.update(self.overrides)
        # As GARDConfig resolves them, so runs record (and fingerprint) what they ran.
        if merged["score"] is None:
            merged["score"] = DEFAULT_SCORES.get(merged["mode"])
        if merged["grow_init"] is None:
            merged["grow_init"] = DEFAULT_GROW_INITS.get(merged["mode"])
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
        """Build every GARD method's config once: a bad option or method fails here, before any model loads."""
        for method in methods:
            if method_kind(method) == "gard":
                for budget in budgets:
                    self.config(method, budget)
        # Non-GARD methods read the shared bounds: check those too.
        GARDConfig(budget=max(budgets) if budgets else 1, **{k: v for k, v in self.overrides.items()})
