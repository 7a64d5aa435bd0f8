"""What runs leave on disk: JSON files written atomically, the fingerprint that makes a grid
resumable, and the loaders `gard report`, `gard plot` and grids read runs back with."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import fingerprint_omissions
from .presets import BASELINE_OPTIONS, method_kind, method_options
from .settings import GardSettings, TrainSettings, config_default


def fingerprint(spec: dict) -> str:
    """Short stable hash of a run's full specification (used to resume grids safely)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def run_spec(method: str, budget: int, seed: int, train: TrainSettings, gard: GardSettings, context: dict) -> dict:
    """Everything that determines a run's result, as one dict (its fingerprint is the resume key)."""
    spec = {
        "method": method,
        "budget": budget,
        "seed": seed,
        "train": train.to_dict(),
        # Resolved options (preset and GARDConfig defaults included): a changed default is a new
        # GARD run; the other methods depend only on the bounds they read.
        "gard": options_read_by(method, gard),
        "model": context.get("model"),
        "corpus": context.get("corpus"),
        "data": context.get("data"),
    }
    # A method's own hyperparameters (presets.method_options): only where it has some, so the
    # runs of methods without them keep their fingerprints.
    options = method_options(method)
    if options:
        spec["method_options"] = options
    return spec


FINGERPRINT_OMISSIONS = fingerprint_omissions()


def options_read_by(method: str, gard: GardSettings) -> dict:
    """The resolved GARDConfig fields method `method` reads: all of them for GARD methods, the
    shared bounds (presets.BASELINE_OPTIONS) for baselines."""
    options = gard.options(method)
    if method_kind(method) == "gard":
        # Fields added after runs were committed are left out at the value that was the earlier
        # behaviour: those runs keep their fingerprints (config.fingerprint_omissions).
        return {
            name: value for name, value in options.items()
            if not (name in FINGERPRINT_OMISSIONS and value == FINGERPRINT_OMISSIONS[name])
        }
    return {name: options[name] for name in BASELINE_OPTIONS}


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically: a crash never leaves a half-written file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_runs(run_dir: Path) -> list[dict]:
    """Every metrics.json under run_dir (itself included), sorted by path."""
    return [read_json(p) for p in sorted(Path(run_dir).rglob("metrics.json"))]


def load_base(run_dir: Path) -> Optional[dict]:
    """The base model's evaluation `gard compare` cached in run_dir/base.json (None if absent)."""
    path = Path(run_dir) / "base.json"
    return read_json(path) if path.is_file() else None
