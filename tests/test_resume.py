"""Kill-and-resume in a custom loop: torch.save'd GARD + optimizer state continue a run exactly."""
import pytest
import torch

import gard_kernels as gk

from .models import batches, tiny_gpt2, tiny_llama
from .util import PAPER_DYNAMIC

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 14


def _config(**overrides) -> gk.GARDConfig:
    # Re-allocations at steps 4, 8, 12; random scores with no smoothing make every one move ranks.
    base = PAPER_DYNAMIC | dict(
        budget=2_000, target_modules=LLAMA_TARGETS, window=3, interval=4, warmup=3, delta_max=2, r_max=6,
        score="random", ema=0.0, seed=5,
    )
    return gk.GARDConfig(**(base | overrides))


def _start(config, state=None):
    """Fresh model, GARD and optimizer; `state` (from torch.load) is restored in the documented order."""
    model = tiny_llama(layers=3)
    gard = gk.GARD(model, config)
    if state is not None:
        gard.load_state_dict(state["gard"])
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    gard.attach_optimizer(opt)
    return model, gard, opt


def _train(model, gard, opt, data):
    losses = []
    for batch in data:
        # Two micro-batches per optimizer step: the ring slot accumulates across them.
        for micro in (batch, {k: v.flip(0) for k, v in batch.items()}):
            loss = model(**micro).loss / 2
            loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("grow_init, shrink", [("zero", "norm"), ("gradient", "svd")])
@pytest.mark.parametrize("kill_after", [7, 8], ids=["before_reallocation", "after_reallocation"])
def test_kill_and_resume_continues_exactly(tmp_path, grow_init, shrink, kill_after):
    config = _config(grow_init=grow_init, shrink=shrink)
    data = batches(STEPS, seed=11)
    model, gard, opt = _start(config)
    losses = _train(model, gard, opt, data[:kill_after])
    path = tmp_path / "run.pt"
    torch.save({"gard": gard.state_dict(), "optimizer": opt.state_dict()}, path)
    losses += _train(model, gard, opt, data[kill_after:])
    assert len({tuple(r["ranks"]) for r in gard.history}) > 2, "the run must change ranks"

    # weights_only=True (the torch default): the state holds tensors and plain containers only.
    state = torch.load(path, weights_only=True)
    resumed_model, resumed, resumed_opt = _start(config, state)
    assert resumed.ranks == {name: r for name, r in zip(gard.names, gard.history[kill_after - 1]["ranks"])}
    resumed_losses = _train(resumed_model, resumed, resumed_opt, data[kill_after:])

    assert resumed_losses == pytest.approx(losses[kill_after:], rel=1e-5, abs=1e-6)
    assert [r["ranks"] for r in resumed.history] == [r["ranks"] for r in gard.history]
    assert resumed.step_count == gard.step_count and resumed.lora_params_mean == gard.lora_params_mean
    for mine, theirs in zip(resumed.lora_parameters(), gard.lora_parameters()):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_state_dict_of_another_model_or_config_is_rejected():
    model, gard, opt = _start(_config())
    _train(model, gard, opt, batches(5))
    state = gard.state_dict()

    with pytest.raises(ValueError, match="budget=2000.*3000"):
        gk.GARD(tiny_llama(layers=3), _config(budget=3_000)).load_state_dict(state)
    with pytest.raises(ValueError, match="grow_init"):
        gk.GARD(tiny_llama(layers=3), _config(grow_init="gradient")).load_state_dict(state)
    # Two layers instead of three: the message names the count and the first module that differs.
    with pytest.raises(ValueError, match=r"21 adapted modules.*14.*model\.layers\.2\.self_attn\.q_proj"):
        gk.GARD(tiny_llama(layers=2), _config()).load_state_dict(state)
    # Same module names, other widths.
    wide = tiny_llama(layers=3)
    wide.model.layers[1].mlp.gate_proj = torch.nn.Linear(32, 40, bias=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*\(32, 48\).*\(32, 40\)"):
        gk.GARD(wide, _config()).load_state_dict(state)
    gpt2_config = _config(target_modules=["c_attn"])
    with pytest.raises(ValueError, match="target_modules"):
        gk.GARD(tiny_gpt2(), gpt2_config).load_state_dict(state)
