"""What runs leave on disk: the fingerprint that makes committed grids resumable."""
import dataclasses
import json
from pathlib import Path

import pytest

from gard_kernels.experiments import io
from gard_kernels.experiments.settings import CONFIG_FIELDS, PER_RUN_FIELDS, GardSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
# The grids docs/results.md reports; `gard compare --out` on them must resume, not refuse.
STUDIES = sorted((ROOT / "docs" / "metrics").glob("study-*"))


def _recomputed_fingerprint(run: dict) -> str:
    """The fingerprint of a finished run from what its metrics.json recorded."""
    # A run recorded before a `fingerprint_omit` field existed (or at its earlier value) lacks
    # it: it ran that earlier value, whatever the field's default is today.
    recorded = {**io.FINGERPRINT_OMISSIONS, **run["hyperparameters"]}
    train = TrainSettings(**{f.name: recorded[f.name] for f in dataclasses.fields(TrainSettings)})
    gard = GardSettings(**{k: recorded[k] for k in CONFIG_FIELDS if k in recorded and k not in PER_RUN_FIELDS})
    context = {key: run.get(key) for key in ("model", "corpus", "data")}
    return io.fingerprint(io.run_spec(run["method"], run["budget"], run["seed"], train, gard, context))


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_runs_keep_their_fingerprints(study):
    files = sorted(study.rglob("metrics.json"))
    assert files, f"{study} holds no runs"
    for path in files:
        run = json.loads(path.read_text(encoding="utf-8"))
        assert _recomputed_fingerprint(run) == run["fingerprint"], path.relative_to(ROOT)


def test_fingerprint_sees_every_setting():
    run = json.loads(next(STUDIES[0].rglob("metrics.json")).read_text(encoding="utf-8"))
    changed = dict(run, hyperparameters={**run["hyperparameters"], "lr": run["hyperparameters"]["lr"] * 2})
    assert _recomputed_fingerprint(changed) != run["fingerprint"]


def test_write_json_is_atomic_and_readable(tmp_path):
    import torch

    path = tmp_path / "a" / "m.json"
    io.write_json(path, {"t": torch.tensor([1.0, 2.0]), "p": Path("x")})
    assert io.read_json(path) == {"t": [1.0, 2.0], "p": "x"}
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        io.write_json(path, {"x": object()})
    assert io.read_json(path)["p"] == "x"
