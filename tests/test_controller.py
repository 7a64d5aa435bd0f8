"""GARD controller on tiny Llama and GPT-2 models: capture, budget, schedules, checkpoints."""
import copy

import pytest
import torch

import gard_kernels as gk
from gard_kernels.lora.layer import LoRALayer

from .models import batches, tiny_gpt2, tiny_llama
from .util import rel_error

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _merged_twin(model: torch.nn.Module, gard: gk.GARD) -> torch.nn.Module:
    """Plain copy of the model with every adapter merged into a base weight that requires grad."""
    twin = copy.deepcopy(model)
    for name in gard.names:
        parent_name, _, attr = name.rpartition(".")
        parent = twin.get_submodule(parent_name)
        layer = getattr(parent, attr)
        base = layer.base
        with torch.no_grad():
            delta = layer.scaling * layer.lora_B @ layer.lora_A  # [d_out, d_in]
            base.weight += delta if isinstance(base, torch.nn.Linear) else delta.T
        base.weight.requires_grad_(True)
        setattr(parent, attr, base)
    return twin


def _true_weight_gradients(twin, gard):
    grads = []
    for name in gard.names:
        base = twin.get_submodule(name)
        g = base.weight.grad.double()
        grads.append(g if isinstance(base, torch.nn.Linear) else g.T)
    return grads


def _check_ring_against_twin(gard, grads, slot, tol):
    k_out, k_in = gard.config.k_out, gard.config.k_in
    for index, (handle, g) in enumerate(zip(gard.handles, grads)):
        sk = handle.sketch
        expected = sk.p_out.double().T @ g @ sk.p_in.double()
        got = gard.ring.buffer[index, slot].view(k_out, k_in)
        assert rel_error(got, expected) < tol, gard.names[index]


@pytest.mark.parametrize("make_model, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_captured_sketch_equals_true_weight_gradient(make_model, targets, micro_batches):
    model = make_model()
    cfg = gk.GARDConfig(budget=10_000, target_modules=targets, mode="dynamic", r_init=2, interval=3, window=3)
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    data = batches(4 * micro_batches)
    # One real step first so B != 0 and the merged twin differs from the base model.
    for batch in data[:micro_batches]:
        model(**batch).loss.backward()
    opt.step(), gard.step(), opt.zero_grad()
    twin = _merged_twin(model, gard)
    slot = gard.ring.slot
    for batch in data[micro_batches : 2 * micro_batches]:
        model(**batch).loss.backward()
        twin(**batch).loss.backward()
    _check_ring_against_twin(gard, _true_weight_gradients(twin, gard), slot, 1e-4)


def test_captured_sketch_under_autocast_bf16():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], r_init=1, window=4, interval=4))
    twin = _merged_twin(model, gard)
    batch = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin_loss = twin(**batch).loss
    twin_loss.backward()
    _check_ring_against_twin(gard, _true_weight_gradients(twin, gard), gard.ring.slot, 3e-2)


def test_gradient_checkpointing_does_not_double_count():
    reference_model = tiny_llama()
    model = copy.deepcopy(reference_model)
    cfg = gk.GARDConfig(budget=10_000, target_modules=["q_proj", "v_proj"], r_init=1, window=4, interval=4)
    gard_ref, gard = gk.GARD(reference_model, cfg), gk.GARD(model, cfg)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()  # HF only checkpoints in training mode
    batch = batches(1)[0]
    reference_model(**batch).loss.backward()
    model(**batch).loss.backward()
    assert rel_error(gard.ring.buffer, gard_ref.ring.buffer) < 1e-5


def test_rank_zero_layers_are_profiled():
    model = tiny_llama()
    # Rank 1 on every layer would cost 4 * (64 + 48) > 100: r_init falls to 0.
    gard = gk.GARD(model, gk.GARDConfig(budget=100, target_modules=["q_proj", "v_proj"], window=3, interval=3, score="update_nuclear", grow_init="zero"))
    assert set(gard.ranks.values()) == {0} and gard.num_lora_params == 0
    opt = torch.optim.SGD(gard.lora_parameters(), lr=0.1)
    gard.attach_optimizer(opt)
    model(**batches(1)[0]).loss.backward()
    opt.step(), gard.step(), opt.zero_grad()
    sketches, valid = gard.ring.window_sketches()
    assert valid[:, -1].all()  # the newest step is last
    assert (sketches[:, -1].norm(dim=1) > 0).all()


@pytest.mark.parametrize("grow_init, shrink", [("zero", "norm"), ("gradient", "svd")])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_dynamic_run_keeps_budget_and_changes_ranks(grow_init, shrink, optimizer):
    model = tiny_llama(layers=3)
    budget = 2_000
    cfg = gk.GARDConfig(
        budget=budget, target_modules=LLAMA_TARGETS, mode="dynamic", window=3, interval=4, warmup=3,
        delta_max=2, r_max=6, grow_init=grow_init, shrink=shrink, score="random", ema=0.0, seed=3,
    )
    gard = gk.GARD(model, cfg)
    params = gard.lora_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.05, momentum=0.9)
    gard.attach_optimizer(opt)
    losses = []
    for batch in batches(30, seed=5):
        loss = model(**batch).loss
        loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
        losses.append(loss.item())
        assert gard.num_lora_params <= budget
        for layer in gard.manager.layers:
            state = opt.state.get(layer.lora_A, {})
            for value in state.values():
                if torch.is_tensor(value) and value.dim() == 2:
                    assert value.shape == layer.lora_A.shape
    assert all(torch.isfinite(torch.tensor(losses)))
    rank_profiles = {tuple(record["ranks"]) for record in gard.history}
    assert len(rank_profiles) > 2
    events = [r["reallocation"] for r in gard.history if "reallocation" in r]
    assert [e["step"] for e in events] == [4, 8, 12, 16, 20, 24, 28]
    for event in events:
        assert max(abs(a - b) for a, b in zip(event["old_ranks"], event["ranks"])) <= 2
    assert gard.lora_params_mean <= budget


def test_static_mode_changes_ranks_exactly_once():
    model = tiny_llama()
    cfg = gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, mode="static", window=4, r_init=0, r_max=8, score="update_nuclear", grow_init="zero")
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for batch in batches(12):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    events = [r for r in gard.history if "reallocation" in r]
    assert len(events) == 1 and events[0]["step"] == 4
    profiles = [tuple(r["ranks"]) for r in gard.history]
    assert len(set(profiles[:3])) == 1 and len(set(profiles[3:])) == 1
    assert gard.num_lora_params <= 1_500 and gard.num_lora_params > 1_500 - max(gard.manager.costs)
    assert not any(h.out is not None for h in gard.handles)  # capture closed after profiling


def test_profile_without_optimizer_steps():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, mode="static", window=4, grow_init="zero"))
    event = gard.profile(batches(4))
    assert event["ranks"] == list(gard.ranks.values())
    assert gard.num_lora_params <= 1_500
    assert all(p.grad is None for p in gard.lora_parameters())
    with pytest.raises(ValueError, match="needs steps"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=1_500, target_modules=["q_proj"], mode="static", grow_init="zero")).profile(batches(2), steps=3)


def _run(model, gard, opt, data):
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_continues_identically():
    cfg = gk.GARDConfig(budget=2_000, target_modules=LLAMA_TARGETS, window=3, interval=4, warmup=3, seed=7,
                        score="update_nuclear", grow_init="gora")
    data = batches(16, seed=9)
    model = tiny_llama()
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    _run(model, gard, opt, data[:7])
    saved = copy.deepcopy({"gard": gard.state_dict(), "opt": opt.state_dict()})
    expected_losses = _run(model, gard, opt, data[7:])

    resumed_model = tiny_llama()
    resumed = gk.GARD(resumed_model, cfg)
    resumed.load_state_dict(saved["gard"])
    resumed_opt = torch.optim.AdamW(resumed.lora_parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.attach_optimizer(resumed_opt)
    losses = _run(resumed_model, resumed, resumed_opt, data[7:])
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert [r["ranks"] for r in resumed.history] == [r["ranks"] for r in gard.history]

    with pytest.raises(ValueError, match="window"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=2_000, target_modules=LLAMA_TARGETS, window=5)).load_state_dict(saved["gard"])
    with pytest.raises(ValueError, match="other adapted modules"):
        other = gk.GARDConfig(budget=2_000, target_modules=LLAMA_TARGETS, window=3, interval=4, warmup=3, seed=7,
                        score="update_nuclear", grow_init="gora")
        gk.GARD(tiny_llama(layers=3), other).load_state_dict(saved["gard"])


def test_wrapping_errors_are_clear():
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=1_000, target_modules=["query"]))
    with pytest.raises(ValueError, match="Linear and"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=1_000, target_modules=["embed_tokens"]))
    model = tiny_llama()
    gk.GARD(model, gk.GARDConfig(budget=1_000, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has GARD adapters"):
        gk.GARD(model, gk.GARDConfig(budget=1_000, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="below r_min"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=100, target_modules=["q_proj"], r_min=1))
    with pytest.raises(ValueError, match="r_init=2"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=100, target_modules=["q_proj"], r_init=2))
    # A regex selects by full name.
    gard = gk.GARD(tiny_llama(), gk.GARDConfig(budget=1_000, target_modules=r"model\.layers\.1\..*_proj"))
    assert all(name.startswith("model.layers.1.") for name in gard.names) and len(gard.names) == 7
    assert all(isinstance(layer, LoRALayer) for layer in gard.manager.layers)


def test_step_without_optimizer_when_resize_is_due_raises():
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, mode="static", window=2, score="update_nuclear", grow_init="zero"))
    for batch in batches(1):
        model(**batch).loss.backward()
        gard.step()
    model(**batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        gard.step()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(alpha=1.0), "alpha"),
        (dict(window=1), "window"),
        (dict(k_in=0), "k_in"),
        (dict(r_min=3, r_max=2), "r_max"),
        (dict(mode="online"), "mode"),
        (dict(score="magic"), "score"),
        (dict(budget=0), "budget"),
        (dict(target_modules=[]), "target_modules"),
        (dict(ema=1.0), "ema"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        gk.GARDConfig(**({"budget": 1000} | bad))


def test_all_rank_zero_start_keeps_capturing_until_layers_grow():
    """With every rank at 0 and the base frozen, only capture lets loss.backward() run at all."""
    model = tiny_llama()
    cfg = gk.GARDConfig(budget=300, target_modules=["q_proj", "v_proj"], window=3, interval=10, warmup=3, score="update_nuclear", grow_init="zero")
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for step, batch in enumerate(batches(12)):
        assert (gard.num_lora_params == 0) <= all(h.out is not None for h in gard.handles)
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    assert gard.history[9]["params"] > 0  # grew at the first re-allocation (step 10)
    assert all(h.out is None for h in gard.handles)  # and the window closed again


def test_default_static_config_without_profile_says_what_profiles_in_the_loop():
    """The defaults need gard.profile twice over (marginal gain and gora_safe): the refusal names
    both and its alternative (a layer score and an unchecked start) then runs in the loop."""
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, window=2))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    model(**batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError) as refused:
        gard.step()
    message = str(refused.value)
    assert "score='marginal_gain' and grow_init='gora_safe' (the defaults)" in message
    assert "set score='update_nuclear' and grow_init='gora' (or 'zero')" in message
    assert gard.step_count == 0
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(budget=1_500, target_modules=LLAMA_TARGETS, window=2,
                                        score="update_nuclear", grow_init="gora"))
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    gard.attach_optimizer(opt)
    for batch in batches(3):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    assert [r["step"] for r in gard.history if "reallocation" in r] == [2]
