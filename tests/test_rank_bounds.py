"""Rank bounds that fit the budget: r_max=None scales with it, and bounds that leave a meaningful
part of the budget out of reach are reported at construction with the numbers."""
import warnings

import pytest
import torch

import gard_kernels as gk
from gard_kernels.experiments.baselines.uniform import UniformMethod
from gard_kernels.experiments.gard_method import GardMethod
from gard_kernels.experiments.method import MethodRun
from gard_kernels.experiments.settings import GardSettings

from .models import batches, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# tiny_llama, two layers: sum of d_in + d_out over the seven projections.
UNIT = 2 * (64 + 48 + 48 + 64 + 80 + 80 + 80)


def _config(budget: int, **overrides) -> gk.GARDConfig:
    return gk.GARDConfig(**({"budget": budget, "target_modules": ALL_LINEAR, "window": 2, "backend": "torch",
                             "k_in": 4, "k_out": 4, "grow_init": "zero"} | overrides))


def _quiet_gard(model, config) -> gk.GARD:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return gk.GARD(model, config)


def test_default_r_max_resolves_to_four_times_the_average_rank_with_a_floor_of_8():
    assert UNIT == 928
    assert gk.GARDConfig(budget=1).r_max is None
    assert _quiet_gard(tiny_llama(), _config(8 * UNIT)).config.r_max == 32
    assert _quiet_gard(tiny_llama(), _config(2 * UNIT)).config.r_max == 8
    assert _quiet_gard(tiny_llama(), _config(4 * UNIT, r_max=6)).config.r_max == 6
    with pytest.raises(ValueError, match=r"r_init=12 is above r_max=8, which r_max=None resolves to at budget 1856"):
        gk.GARD(tiny_llama(), _config(2 * UNIT, r_init=12))


def test_a_budget_of_average_rank_8_is_not_forced_to_uniform_rank_8():
    # The old default r_max = 8 made every layer rank 8 here: uniform LoRA under another name.
    gard = _quiet_gard(tiny_llama(), _config(8 * UNIT))
    event = gard.profile(batches(2))
    assert max(event["ranks"]) > 8 and min(event["ranks"]) < 8
    assert event["params"] > 0.9 * gard.config.budget


def test_bounds_that_leave_the_budget_unspendable_warn_with_the_numbers():
    with pytest.warns(UserWarning, match=(
        r"GARD can spend at most 7424 of the budget 14848 \(50 %\): r_max=8 \(and min\(d_in, d_out\) per layer\) "
        r"bounds the ranks of the 14 target layers; raise r_max to 16 to make the whole budget reachable"
    )):
        gk.GARD(tiny_llama(), _config(16 * UNIT, r_max=8))
    with pytest.warns(UserWarning, match=r"at most 26624 of the budget 40000 \(67 %\): the 14 target layers at full rank"):
        gk.GARD(tiny_llama(), _config(40_000))
    _quiet_gard(tiny_llama(), _config(16 * UNIT))  # r_max=None reaches it
    _quiet_gard(tiny_llama(), _config(8 * UNIT, r_max=8))  # exactly reachable


def test_resolved_r_max_round_trips_through_state_dict_and_peft_export(tmp_path):
    pytest.importorskip("peft")
    config = _config(8 * UNIT)
    gard = _quiet_gard(tiny_llama(), config)
    gard.profile(batches(2))
    state = gard.state_dict()
    assert state["config"]["r_max"] == 32
    # The same config (r_max None) and the resolved value both accept the state.
    for again in (config, _config(8 * UNIT, r_max=32)):
        resumed = _quiet_gard(tiny_llama(), again)
        resumed.load_state_dict(state)
        assert resumed.ranks == gard.ranks
    gard.save_pretrained(tmp_path)
    assert gk.load_adapter(tiny_llama(), tmp_path, config=config).ranks == gard.ranks
    # Without a config: the adapter's own modules (rank-0 ones are not in it).
    assert gk.load_adapter(tiny_llama(), tmp_path).ranks == {n: r for n, r in gard.ranks.items() if r}


def test_experiment_methods_record_the_resolved_bound_and_earlier_ones_keep_8():
    settings = GardSettings(target_modules=ALL_LINEAR, backend="torch", k_in=4, k_out=4)
    assert settings.value("r_max", "gard") is None
    assert all(settings.value("r_max", name) == 8 for name in ("uniform", "gora", "eva", "adalora", "gard-paper-static"))
    method = GardMethod(MethodRun("gard", tiny_llama(), 8 * UNIT, settings, 0, 4, 1e-3))
    assert method.details["gard_config"]["r_max"] == 32

    def uniform(settings):
        return UniformMethod(MethodRun("uniform", tiny_llama(), 16 * UNIT, settings, 0, 4, 1e-3))

    assert uniform(GardSettings(target_modules=ALL_LINEAR)).r_max == 8
    uniform = uniform(GardSettings(target_modules=ALL_LINEAR, r_max=None))
    assert uniform.r_max == 64 and max(uniform.ranks().values()) == 16
