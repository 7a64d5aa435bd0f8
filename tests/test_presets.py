"""The method registry: listed names, legacy names, and the one unknown-method check."""
import pytest

from gard_kernels.cli import build_parser
from gard_kernels.experiments import presets
from gard_kernels.experiments.baselines import BASELINES
from gard_kernels.experiments.settings import GardSettings, TrainSettings


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


@pytest.mark.usefixtures("one_thread")
def test_a_new_baseline_is_one_class_and_one_registry_entry(monkeypatch):
    """What method.py's docstring promises: a Method subclass with __init__(run) and the four
    required hooks runs through the shared training loop, metrics.json included."""
    from gard_kernels.experiments import data, runner
    from gard_kernels.experiments.baselines.fixed_rank import FixedRankMethod
    from gard_kernels.experiments.workspace import make_workspace

    from .models import VOCAB, tiny_llama

    class FirstLayerOnly(FixedRankMethod):
        """Rank 1 on the first adapted module, nothing elsewhere."""

        def __init__(self, run):
            super().__init__(run)
            plan = [1] + [0] * (len(self.manager.layers) - 1)
            for layer, rank in zip(self.manager.layers, plan):
                layer.resize(rank, generator=self.generator)
            self.details = {"plan": self.plan(plan)}

    monkeypatch.setitem(presets.METHODS, "first-layer", {"kind": "first-layer", "config": presets.BASELINE_PRESET})
    monkeypatch.setitem(presets.KINDS, "first-layer", FirstLayerOnly)
    ws = make_workspace(tiny_llama(), data.ByteTokenizer(VOCAB), "tiny-llama", "pydoc-topics", 16, progress=False)
    train = TrainSettings(steps=3, batch_size=2, max_len=16, eval_blocks=4, eval_batch_size=4, test_blocks=0)
    metrics = runner.finetune("first-layer", 500, 0, ws.model, ws.data, train, GardSettings(backend="torch"))
    first = metrics["adapted_modules"][0]
    assert metrics["final_ranks"] == {name: int(name == first) for name in metrics["adapted_modules"]}
    assert metrics["lora_params_final"] == metrics["lora_params_mean"] > 0
    assert metrics["method_details"] == {"plan": metrics["final_ranks"]} and len(metrics["history"]) == 3
