"""Bad input and faults: clear errors, non-finite gradients, unused layers, eigensolver failures."""
import math
import warnings

import pytest
import torch
from torch import nn

import gard_kernels as gk
from gard_kernels.spectra import SpectrumWarning

from .util import PAPER_DYNAMIC


class Net(nn.Module):
    """Three used Linear layers and one (`spare`) that forward never calls: its gradient is zero."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 10)
        self.out = nn.Linear(10, 6)
        self.spare = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


TARGETS = ["inp", "mid", "out", "spare"]
SPARE = 3


def _config(**overrides) -> gk.GARDConfig:
    base = PAPER_DYNAMIC | dict(budget=400, target_modules=TARGETS, window=3, interval=3, warmup=3, r_max=6, backend="torch", seed=1)
    return gk.GARDConfig(**(base | overrides))


def _batch(step: int, bad: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)
    if bad == "nan":
        x[0, 0] = float("nan")
    elif bad == "huge":
        x = x * 1e6
    return x, y


def _train(model, gard, steps, bad_steps=(), scaler=None, autocast_dtype=None):
    """Plain loop; a step with a non-finite loss skips optimizer.step (or GradScaler skips it) but still calls gard.step."""
    opt = gard.optimizer
    for step in range(steps):
        x, y = _batch(step, "huge" if scaler is not None and step in bad_steps else "nan" if step in bad_steps else None)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = nn.functional.mse_loss(model(x).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
        gard.step()
        opt.zero_grad()


def _gard(model, **overrides) -> gk.GARD:
    gard = gk.GARD(model, _config(**overrides))
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-2))
    return gard


def _events(gard):
    return [r["reallocation"] for r in gard.history if "reallocation" in r]


def _assert_healthy(gard):
    assert gard.num_lora_params <= gard.config.budget
    for event in _events(gard):
        for key in ("eigenvalues", "statistic", "scores"):
            assert all(math.isfinite(v) for v in torch.tensor(event[key]).flatten().tolist()), key
    for param in gard.lora_parameters():
        assert torch.isfinite(param).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(alpha=1.0), r"alpha must be in \(0, 1\)"),
        (dict(alpha=0.0), r"alpha must be in \(0, 1\)"),
        (dict(window=1), r"window must be an int >= 2"),
        (dict(k_in=0), r"k_in must be a positive int"),
        (dict(k_out=-3), r"k_out must be a positive int"),
        (dict(r_min=4, r_max=2), r"r_max must be an int >= max\(r_min, 1\)"),
    ],
)
def test_invalid_config_names_the_field_and_the_valid_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_budget_below_r_min_floor_says_how_much_is_needed():
    floor = 2 * (28 + 26 + 16 + 32)
    with pytest.raises(ValueError, match=rf"raise the budget to at least {floor} or lower r_min"):
        gk.GARD(Net(), _config(budget=floor - 1, r_min=2))
    gk.GARD(Net(), _config(budget=floor, r_min=2))


def test_r_min_above_a_layer_size_is_refused_before_training():
    # "out" is Linear(10, 6): no rank above 6 exists there.
    with pytest.raises(ValueError, match=r"r_min=7 exceeds min\(d_in, d_out\) of 1 adapted layer\(s\), e.g. 'out' \(6\); lower r_min to 6"):
        gk.GARD(Net(), _config(r_min=7, r_max=8, budget=10_000))


def test_target_modules_matching_nothing_lists_the_candidates():
    with pytest.raises(ValueError, match=r"matched no module.*\['inp', 'mid', 'out', 'spare'\]"):
        gk.GARD(Net(), _config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="matched no module"):
        gk.GARD(Net(), _config(target_modules=r"layers\..*"))


def test_model_already_wrapped_is_refused():
    model = Net()
    gk.GARD(model, _config())
    with pytest.raises(ValueError, match="already has GARD adapters.*load"):
        gk.GARD(model, _config(target_modules=["inp"]))


def test_step_before_optimizer_when_a_resize_is_due():
    model = Net()
    gard = gk.GARD(model, _config(mode="static"))
    for step in range(2):
        nn.functional.mse_loss(model(_batch(step)[0]), _batch(step)[1]).backward()
        gard.step()
    nn.functional.mse_loss(model(_batch(2)[0]), _batch(2)[1]).backward()
    with pytest.raises(RuntimeError, match=r"attach_optimizer\(optimizer\)"):
        gard.step()
    with pytest.raises(ValueError, match="lora_parameters"):
        gard.attach_optimizer(torch.optim.SGD(list(gard.lora_parameters())[:2], lr=0.1))


def test_nan_batch_is_discarded_counted_and_warned_once():
    model = Net()
    gard = _gard(model)
    clean_model = Net()
    clean = _gard(clean_model)
    _train(clean_model, clean, 9)
    # Bad steps in the windows of the re-allocations at steps 3 and 9 (step indices 1 and 7).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, gard, 9, bad_steps=(1, 7))
    non_finite = [w for w in caught if "non-finite sketch slot" in str(w.message)]
    assert len(non_finite) == 1 and issubclass(non_finite[0].category, RuntimeWarning)
    used = len(TARGETS) - 1  # the spare layer sees no gradient, so nothing non-finite either
    assert gard.ring.num_invalid == 2 * used
    events, clean_events = _events(gard), _events(clean)
    assert [e["invalid_total"] for e in events] == [used, used, 2 * used]
    # The bad step's slot is gone from the first window: one valid slot fewer per used layer.
    assert [v + (i != SPARE) for i, v in enumerate(events[0]["valid_slots"])] == clean_events[0]["valid_slots"]
    _assert_healthy(gard)


def test_grad_scaler_skipped_fp16_overflow_step():
    model = Net()
    gard = _gard(model, r_init=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in gard.lora_parameters()]
    _train(model, gard, 1, bad_steps=(0,), scaler=scaler, autocast_dtype=torch.float16)
    # fp16 activations overflowed: GradScaler skipped the optimizer step and GARD the slot.
    assert scaler.get_scale() < 2.0**8
    assert all(torch.equal(a, b) for a, b in zip(before, gard.lora_parameters()))
    assert gard.ring.num_invalid == len(TARGETS) - 1  # the unused layer saw no gradient at all
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _train(model, gard, 5, scaler=scaler, autocast_dtype=torch.float16)
    _assert_healthy(gard)


def test_non_finite_step_armed_for_gradient_initialised_growth():
    # The last step before each re-allocation feeds the range finder that seeds grown directions.
    model = Net()
    gard = _gard(model, grow_init="gradient", score="uniform", r_init=0, r_max=4, delta_max=4, budget=600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, gard, 6, bad_steps=(2,))
    assert any(e["ranks"] != e["old_ranks"] for e in _events(gard))
    _assert_healthy(gard)


@pytest.mark.parametrize("score", ["spectral", "grad_norm"])
@pytest.mark.parametrize("r_min", [0, 1])
def test_layer_with_zero_gradient_gets_rank_zero_statistic_and_r_min(score, r_min):
    model = Net()
    gard = _gard(model, score=score, r_min=r_min, r_init=3, delta_max=6, ema=0.0)
    _train(model, gard, 6)
    for event in _events(gard):
        assert event["statistic"][SPARE] == 0.0
        assert all(v == 0.0 for v in event["eigenvalues"][SPARE])
    assert gard.ranks["spare"] == r_min
    assert all(gard.ranks[name] > r_min for name in ("inp", "mid"))
    _assert_healthy(gard)


def test_unused_layer_grows_with_gradient_init_without_a_gradient():
    # Uniform scores grow every layer, the unused one included: it gets random directions.
    model = Net()
    gard = _gard(model, grow_init="gradient", score="uniform", r_init=0, r_max=4, delta_max=4, budget=600)
    _train(model, gard, 3)
    assert gard.ranks["spare"] > 0
    _assert_healthy(gard)


def _run_with(monkeypatch, fail):
    """A dynamic run whose eigvalsh fails where `fail(matrices)` says so."""
    real = torch.linalg.eigvalsh

    def flaky(mats, *args, **kwargs):
        if fail(mats):
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return real(mats, *args, **kwargs)

    model = Net()
    gard = _gard(model, r_init=2)
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "eigvalsh", flaky)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, gard, 9)
    return gard, [w for w in caught if issubclass(w.category, SpectrumWarning)]


def test_eigensolver_failure_falls_back_instead_of_crashing(monkeypatch):
    reference, none = _run_with(monkeypatch, lambda mats: False)
    assert none == []
    # The batched solve fails, the per-layer CPU retry succeeds: same run as without the fault.
    retried, caught = _run_with(monkeypatch, lambda mats: mats.dim() == 3)
    assert caught and "retrying per layer" in str(caught[0].message)
    assert [r["ranks"] for r in retried.history] == [r["ranks"] for r in reference.history]
    # Every solve fails: zero spectra, uniform scores, the run goes on within the budget.
    broken, caught = _run_with(monkeypatch, lambda mats: True)
    assert any("using zero eigenvalues" in str(w.message) for w in caught)
    assert all(e["statistic"] == [0.0] * len(TARGETS) for e in _events(broken))
    _assert_healthy(broken)
