"""lora_budget: the parameters of uniform LoRA at a rank, as PEFT counts them."""
import pytest
import torch

import gard_kernels as gk

from .models import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _peft_lora_parameters(model, target_modules, rank: int) -> int:
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules)
    wrapped = peft.get_peft_model(model, config)
    return sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "c_attn"]])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_budget_equals_what_peft_trains_at_that_rank(build, targets, rank):
    model = build()
    if isinstance(targets, list):
        # Each model has only its own names of the list.
        targets = [t for t in targets if any(n.endswith(t) for n, _ in model.named_modules())]
    budget = gk.lora_budget(model, targets, rank)
    assert budget == _peft_lora_parameters(build(), targets, rank) > 0


def test_llama_all_linear_by_hand():
    # hidden 32, intermediate 48, 2 of 4 heads for k / v (16 features): per block
    # q 32+32, k 32+16, v 32+16, o 32+32, gate / up 32+48, down 48+32.
    per_block = 64 + 48 + 48 + 64 + 80 + 80 + 80
    assert gk.lora_budget(tiny_llama(layers=2), "all-linear", 8) == 8 * 2 * per_block


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "8"])
def test_rank_must_be_a_positive_int(rank):
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        gk.lora_budget(tiny_llama(), "all-linear", rank)


def test_model_is_left_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gk.lora_budget(model, "all-linear", 4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
