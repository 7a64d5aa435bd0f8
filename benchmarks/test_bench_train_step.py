"""Training-step time of GARD (dynamic, capture on every step) over plain LoRA at the same ranks.

Both benchmarks build the same model and the same GARD controller and run a few steps so the
first re-allocation has settled the ranks. The baseline then switches capture off for good and
never calls gard.step(): it is plain LoRA through the same LoRALayer modules at the same ranks.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gard_kernels as gk

from .conftest import tag
from .shapes import TRAIN_STEP_MODELS

# interval == window: capture is on at every step; re-allocations every 8 steps are included.
WINDOW = 8


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


def _settle(model, gard, opt, batch):
    for _ in range(WINDOW + 1):
        _train_step(model, opt, batch, gard)


@pytest.mark.parametrize("model_name", list(TRAIN_STEP_MODELS))
def test_train_step_plain_lora(benchmark, model_name):
    model, gard, opt, batch = _setup(model_name)
    _settle(model, gard, opt, batch)
    for handle in gard.handles:
        handle.out = None
    benchmark.group = f"train step {model_name}"
    benchmark.extra_info["ranks"] = sorted(set(gard.ranks.values()))
    tag(benchmark, "baseline")
    benchmark.pedantic(lambda: _train_step(model, opt, batch), rounds=8, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("model_name", list(TRAIN_STEP_MODELS))
def test_train_step_gard_dynamic(benchmark, model_name):
    model, gard, opt, batch = _setup(model_name)
    _settle(model, gard, opt, batch)
    assert all(h.out is not None for h in gard.handles)
    benchmark.group = f"train step {model_name}"
    benchmark.extra_info["ranks"] = sorted(set(gard.ranks.values()))
    # Target: GARD's step <= 1.03x plain LoRA's, i.e. a "speedup" of >= 1/1.03.
    tag(benchmark, "candidate", target=round(1 / 1.03, 3))
    benchmark.pedantic(lambda: _train_step(model, opt, batch, gard), rounds=8, iterations=1, warmup_rounds=1)
