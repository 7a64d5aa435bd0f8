"""A refused step() or profile() leaves GARD exactly as it was, and the retried call gives the run
that was meant; junk profiles are refused; a foreign optimizer's step is refused with GARD's message."""
import gc
import weakref
import warnings

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

import gard_kernels as gk

from .models import batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _config(**overrides) -> gk.GARDConfig:
    # Static mode profiling inside the training loop (a layer score; GoRA's start needs the optimizer).
    return gk.GARDConfig(**({"budget": 900, "target_modules": TARGETS, "window": 4, "backend": "torch",
                             "k_in": 4, "k_out": 4, "seed": 2, "score": "update_nuclear", "grow_init": "gora"} | overrides))


def _state(gard: gk.GARD) -> dict:
    """What a refused call must leave as it was."""
    ring = gard.ring.state_dict()
    return {
        "step_count": gard.step_count,
        "allocated": gard.allocated,
        "ranks": dict(gard.ranks),
        "history": len(gard.history),
        "ring": {k: v.clone() if torch.is_tensor(v) else v for k, v in ring.items()},
        "generator": gard._generator.get_state().clone(),
        "factors": [p.detach().clone() for p in gard.lora_parameters()],
    }


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN slots of a junk step included)."""
    return a.shape == b.shape and a.dtype == b.dtype and bytes(a.numpy().tobytes()) == bytes(b.numpy().tobytes())


def _assert_same_state(gard: gk.GARD, before: dict) -> None:
    after = _state(gard)
    for key in ("step_count", "allocated", "ranks", "history"):
        assert after[key] == before[key], key
    for key, value in before["ring"].items():
        assert _bitwise_equal(after["ring"][key], value) if torch.is_tensor(value) else after["ring"][key] == value, key
    assert torch.equal(after["generator"], before["generator"])
    assert all(torch.equal(a, b) for a, b in zip(after["factors"], before["factors"]))


def _nan_loss(model, batch):
    return model(**batch).loss * float("nan")


def _backward(model, batch, nan: bool = False) -> None:
    (_nan_loss(model, batch) if nan else model(**batch).loss).backward()


def _same_adapters(a: gk.GARD, b: gk.GARD) -> bool:
    return a.ranks == b.ranks and all(torch.equal(p, q) for p, q in zip(a.lora_parameters(), b.lora_parameters()))


def test_static_step_without_optimizer_changes_nothing_and_the_retry_allocates():
    data = batches(4)
    reference_model, model = tiny_llama(), tiny_llama()
    reference = gk.GARD(reference_model, _config(grow_init="zero"))
    reference.attach_optimizer(torch.optim.SGD(reference.lora_parameters(), lr=0.1))
    gard = gk.GARD(model, _config(grow_init="zero"))
    for run, net in ((reference, reference_model), (gard, model)):
        for batch in data[:3]:
            _backward(net, batch)
            run.step()
        _backward(net, data[3])
    reference.step()
    before = _state(gard)
    with pytest.raises(RuntimeError, match=r"no optimizer is attached: call gard.attach_optimizer\(optimizer\)"):
        gard.step()
    _assert_same_state(gard, before)
    gard.attach_optimizer(torch.optim.SGD(gard.lora_parameters(), lr=0.1))
    event = gard.step()
    assert event is not None and gard.allocated and gard.step_count == 4
    assert _same_adapters(gard, reference)


def test_profile_with_gora_init_and_no_optimizer_takes_no_batch():
    model = tiny_llama()
    gard = gk.GARD(model, _config())  # grow_init "gora"
    data = batches(5)
    stream = iter(data)
    before = _state(gard)
    with pytest.raises(RuntimeError, match=r"attach the optimizer \(gard.attach_optimizer\) before profile\(\)"):
        gard.profile(stream)
    _assert_same_state(gard, before)
    assert next(stream) is data[0]
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-3))
    event = gard.profile(iter(data))
    assert gard.allocated and event["params"] > 0


def test_junk_profile_is_refused_unchanged_and_a_retry_gives_the_clean_run():
    data = batches(4)
    reference_model, model = tiny_llama(), tiny_llama()
    reference = gk.GARD(reference_model, _config(grow_init="zero"))
    reference.profile(data)
    gard = gk.GARD(model, _config(grow_init="zero"))
    before = _state(gard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"only 0 of the window's 4 step\(s\) had finite gradients .* at least 2"):
            gard.profile(data, loss_fn=_nan_loss)
    _assert_same_state(gard, before)
    assert all(p.grad is None for p in model.parameters())
    gard.profile(data)
    assert _same_adapters(gard, reference)


def test_profile_needs_the_configured_share_of_finite_steps():
    data = batches(4)

    def some_nan(bad):
        seen = iter(range(len(data)))
        return lambda model, batch: _nan_loss(model, batch) if next(seen) in bad else model(**batch).loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # One NaN step of four: three finite, at least two needed (max(2, window // 2)).
        event = gk.GARD(tiny_llama(), _config(grow_init="zero")).profile(data, loss_fn=some_nan({1}))
        assert event["invalid_total"] > 0
        with pytest.raises(ValueError, match=r"only 1 of the window's 4 step\(s\)"):
            gk.GARD(tiny_llama(), _config(grow_init="zero")).profile(data, loss_fn=some_nan({0, 1, 3}))
        with pytest.raises(ValueError, match=r"only 3 of the window's 4 step\(s\) .* at least 4"):
            gk.GARD(tiny_llama(), _config(grow_init="zero", min_valid_steps=4)).profile(data, loss_fn=some_nan({2}))


def test_static_allocation_from_junk_steps_is_refused_unchanged():
    model = tiny_llama()
    gard = gk.GARD(model, _config(grow_init="zero"))
    gard.attach_optimizer(torch.optim.SGD(gard.lora_parameters(), lr=0.1))
    data = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in data[:3]:
            _backward(model, batch, nan=True)
            gard.step()
            model.zero_grad()
        _backward(model, data[3], nan=True)
        before = _state(gard)
        with pytest.raises(ValueError, match=r"cannot allocate ranks at step 4: only 0 of the window's 4 step\(s\).*gard.profile\(batches\)"):
            gard.step()
    _assert_same_state(gard, before)
    # The way on that the message gives: the allocation from finite batches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        event = gard.profile(batches(4, seed=5))
    assert gard.allocated and event["params"] > 0 and gard.step_count == 3


def test_dynamic_window_of_junk_skips_the_reallocation_and_says_so():
    model = tiny_llama()
    gard = gk.GARD(model, _config(mode="dynamic", grow_init="zero", window=2, interval=2, warmup=2, r_init=1))
    gard.attach_optimizer(torch.optim.SGD(gard.lora_parameters(), lr=0.1))
    data = batches(4)
    ranks = dict(gard.ranks)
    with pytest.warns(RuntimeWarning, match=r"skipped the re-allocation at step 2: only 0 of the window's 2 step\(s\)"):
        for batch in data[:2]:
            _backward(model, batch, nan=True)
            assert gard.step() is None
            model.zero_grad()
    assert gard.ranks == ranks and gard.ema_statistic is None
    assert "only 0 of the window" in gard.history[-1]["reallocation_skipped"]
    events = []
    for batch in data[2:]:
        _backward(model, batch)
        events.append(gard.step())
        model.zero_grad()
    assert events[-1] is not None and events[-1]["valid_slots"] == [2] * 4


def test_suggest_lora_config_refuses_batches_whose_losses_are_all_nan():
    pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"only 0 of the window's 4 step\(s\) had finite gradients"):
            gk.suggest_lora_config(
                tiny_llama(), batches(4), budget=900, target_modules=TARGETS, loss_fn=_nan_loss, backend="torch",
            )


@pytest.mark.parametrize("value", [1, 5, 2.0])
def test_min_valid_steps_is_validated(value):
    with pytest.raises(ValueError, match=r"min_valid_steps must be None or an int in \[2, window\] = \[2, 4\]"):
        _config(min_valid_steps=value)


def test_stepping_an_optimizer_other_than_the_attached_one_is_refused():
    model = tiny_llama()
    gard = gk.GARD(model, _config(grow_init="zero"))
    attached = torch.optim.AdamW(gard.lora_parameters(), lr=1e-3)
    gard.attach_optimizer(attached)
    other = torch.optim.AdamW(gard.lora_parameters(), lr=1e-3)
    head = torch.optim.SGD(model.lm_head.parameters(), lr=0.1)
    _backward(model, batches(1)[0])
    with pytest.raises(RuntimeError, match=r"this AdamW holds GARD's LoRA parameters but is not the optimizer attached"):
        other.step()
    assert not other.state
    attached.step()
    head.step()  # holds no LoRA factor: none of GARD's business
    gc.collect()
    hooks = len(_global_optimizer_pre_hooks)
    second = gk.GARD(tiny_llama(), _config(grow_init="zero"))
    assert len(_global_optimizer_pre_hooks) == hooks  # one global hook for every GARD
    # The adapters' capture handles call back into GARD: it lives as long as its model, and no
    # optimizer (nor the hook) keeps it alive after that.
    alive = weakref.ref(gard)
    del gard, model, second
    gc.collect()
    assert alive() is None
    other.step()


def test_unknown_backend_is_refused_by_the_config():
    with pytest.raises(ValueError, match="backend"):
        gk.GARDConfig(budget=900, backend="nonsense")
