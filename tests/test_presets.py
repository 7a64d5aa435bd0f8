"""The method registry: listed names, legacy names, and the one unknown-method check."""
import pytest

from gard_kernels.cli import build_parser
from gard_kernels.experiments import presets
from gard_kernels.experiments.baselines import BASELINES
from gard_kernels.experiments.settings import GardSettings


def test_legacy_names_run_the_paper_presets_but_are_not_listed(capsys):
    assert presets.LEGACY_METHODS and not set(presets.LEGACY_METHODS) & set(presets.METHODS)
    gard = GardSettings()
    assert gard.options("gard-dynamic") == gard.options("gard-paper-dynamic")
    assert gard.options("gard-static") == gard.options("gard-paper-static")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    shown = capsys.readouterr().out
    assert "gard-paper-dynamic" in shown and "gard-dynamic," not in shown and "gard-static," not in shown
    args = build_parser().parse_args(["compare", "--methods", "gard-dynamic"])
    assert args.methods == ["gard-dynamic"]


def test_unknown_method_is_one_message_everywhere():
    from gard_kernels.experiments.compare import plan_grid

    message = f"unknown method 'lora-xl'; choose from {', '.join(presets.METHODS)}"
    for call in (
        lambda: presets.method_kind("lora-xl"),
        lambda: GardSettings().validate(["lora-xl"], [100]),
        lambda: GardSettings().options("lora-xl"),
        lambda: plan_grid(["lora-xl"], [100], [0], GardSettings()),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_every_baseline_is_a_method_with_the_shared_bounds():
    for name, kind in BASELINES.items():
        assert presets.METHODS[name] == {"kind": name, "config": presets.BASELINE_PRESET}
        assert presets.KINDS[name] is kind
    # The display order: GARD methods first, baselines after, legacy names after those.
    order = sorted([*presets.METHODS, *presets.LEGACY_METHODS, "zzz"], key=presets.method_order)
    assert order[0] == "gard" and order[-1] == "zzz" and order[-3:-1] == list(presets.LEGACY_METHODS)
