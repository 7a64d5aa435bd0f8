"""Options declared once: GARDConfig's and TrainSettings' fields carry their help, and both
validate every field on construction."""
import dataclasses

import pytest

from gard_kernels.cli import build_parser
from gard_kernels.config import GARDConfig
from gard_kernels.experiments.settings import SettingError, TrainSettings
from gard_kernels.sketch.dispatch import ALL_BACKENDS


@pytest.mark.parametrize("cls", [GARDConfig, TrainSettings])
def test_every_field_documents_itself(cls):
    for f in dataclasses.fields(cls):
        assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"
    # The class docstring no longer holds a second copy (an Args list) of the options.
    assert "Args:" not in cls.__doc__


def test_help_texts_come_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in [*dataclasses.fields(GARDConfig), *dataclasses.fields(TrainSettings)]:
        if f.name in ("budget", "seed", "mode", "score", "weight_decay", "eval_batch_size", "lr"):
            continue
        assert " ".join(f.metadata["help"].split())[:40] in shown, f.name


def test_a_backend_typo_fails_at_construction_with_the_choices():
    with pytest.raises(ValueError) as err:
        GARDConfig(budget=100, backend="tritn")
    assert "backend" in str(err.value) and "'tritn'" in str(err.value)
    assert all(name in str(err.value) for name in ("auto", *ALL_BACKENDS))
    for name in ("auto", *ALL_BACKENDS):
        assert GARDConfig(budget=100, backend=name).backend == name


@pytest.mark.parametrize("name, bad", [
    ("lr", 0.0), ("lr", -1e-3), ("batch_size", 0), ("batch_size", 2.0), ("steps", 0), ("max_len", 1),
    ("warmup_ratio", 1.5), ("weight_decay", -0.1), ("grad_clip", -1.0), ("eval_blocks", 0),
    ("eval_batch_size", 0), ("eval_every", -1), ("test_blocks", -1), ("precision", "fp8"), ("compile", "yes"),
])
def test_train_settings_refuse_each_bad_field_by_name(name, bad):
    with pytest.raises(SettingError) as err:
        TrainSettings(**{name: bad})
    assert err.value.name == name and str(err.value).startswith(f"{name} must be") and repr(bad) in str(err.value)


def test_train_settings_accept_the_documented_special_values():
    settings = TrainSettings(eval_blocks=None, test_blocks=0, grad_clip=0.0, warmup_ratio=0.0, precision="bf16")
    assert settings.test_blocks == 0 and settings.eval_blocks is None


@pytest.mark.parametrize("name, bad", [
    ("alpha", "0.9"), ("alpha", None), ("ema", "0.5"), ("scaling", None), ("scaling", float("inf")), ("dead_band", "x"),
    ("window", 2.0), ("k_in", "16"), ("r_max", 0), ("measure", "nope"), ("target_modules", []), ("budget", 1.5),
])
def test_gard_config_refuses_each_bad_field_with_a_value_error(name, bad):
    with pytest.raises(ValueError, match=f"GARDConfig: {name}"):
        GARDConfig(**{"budget": 100, name: bad})
