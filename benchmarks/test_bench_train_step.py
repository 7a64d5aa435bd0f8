"""Training-step time of GARD (dynamic, capture on every step) over plain LoRA at the same ranks.

Both benchmarks use one model and GARD controller, run a few steps so the first re-allocation
has settled the ranks, then alternate: the baseline's steps switch capture off and skip
gard.step() (plain LoRA through the same LoRALayer modules at the same ranks), GARD's steps
capture and call gard.step().
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gard_kernels as gk

from .conftest import tag
from .shapes import TRAIN_STEP_MODELS

# interval == window: capture is on at every step; re-allocations every 8 steps are included.
WINDOW = 8
# Timed steps per benchmark: two re-allocations' worth, so their cost is in the median's reach.
ROUNDS = 16


def _setup(model_name: str):
    spec = dict(TRAIN_STEP_MODELS[model_name])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, **spec)).eval()
    costs = spec["num_hidden_layers"] * (2 * spec["hidden_size"] + spec["hidden_size"] * 4 // 3)
    cfg = gk.GARDConfig(
        budget=4 * costs, target_modules=["q_proj", "v_proj"], mode="dynamic", window=WINDOW,
        interval=WINDOW, warmup=WINDOW, score="uniform", r_max=8,
    )
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-4)
    gard.attach_optimizer(opt)
    ids = torch.randint(0, spec["vocab_size"], (batch, seq))
    return model, gard, opt, {"input_ids": ids, "labels": ids}


def _train_step(model, opt, batch, gard=None):
    model(**batch).loss.backward()
    opt.step()
    if gard is not None:
        gard.step()
    opt.zero_grad(set_to_none=True)


def _plain_step(model, gard, opt, batch):
    """Plain LoRA through the same layers at the same ranks: capture off, no gard.step()."""
    for handle in gard.handles:
        handle.enabled = False
    _train_step(model, opt, batch)
    for handle in gard.handles:
        handle.enabled = True


def _settle(model, gard, opt, batch):
    for _ in range(WINDOW + 1):
        _train_step(model, opt, batch, gard)


# The two benchmarks share one model and interleave: each timed step of one kind follows an
# untimed step of the other kind (pedantic's setup), so both see the same machine conditions and
# their medians compare side by side.
@pytest.fixture(scope="module")
def trained(request):
    cache = {}

    def get(model_name):
        if model_name not in cache:
            model, gard, opt, batch = _setup(model_name)
            _settle(model, gard, opt, batch)
            cache[model_name] = (model, gard, opt, batch)
        return cache[model_name]

    return get


@pytest.mark.parametrize("model_name", list(TRAIN_STEP_MODELS))
def test_train_step_plain_lora(benchmark, trained, model_name):
    model, gard, opt, batch = trained(model_name)
    benchmark.group = f"train step {model_name}"
    benchmark.extra_info["ranks"] = sorted(set(gard.ranks.values()))
    tag(benchmark, "baseline")
    benchmark.pedantic(
        lambda: _plain_step(model, gard, opt, batch),
        setup=lambda: _train_step(model, opt, batch, gard),
        rounds=ROUNDS, iterations=1, warmup_rounds=1,
    )


@pytest.mark.parametrize("model_name", list(TRAIN_STEP_MODELS))
def test_train_step_gard_dynamic(benchmark, trained, model_name):
    model, gard, opt, batch = trained(model_name)
    assert all(h.out is not None for h in gard.handles)
    benchmark.group = f"train step {model_name}"
    benchmark.extra_info["ranks"] = sorted(set(gard.ranks.values()))
    # Target: GARD's step <= 1.03x plain LoRA's, i.e. a "speedup" of >= 1/1.03.
    tag(benchmark, "candidate", target=round(1 / 1.03, 3))
    benchmark.pedantic(
        lambda: _train_step(model, opt, batch, gard),
        setup=lambda: _plain_step(model, gard, opt, batch),
        rounds=ROUNDS, iterations=1, warmup_rounds=1,
    )
