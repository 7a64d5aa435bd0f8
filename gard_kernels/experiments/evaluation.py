"""The loss every method trains on and the perplexity every run is judged by."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def autocast_context(precision: str, device: torch.device):
    """The context a training forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, T] block batch (plus any loss the model adds,
    e.g. AdaLoRA's orthogonality penalty). The batch moves to the model's device."""
    batch = batch.to(model_device(model))
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: Sequence[tuple[str, torch.Tensor]],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """Token-level perplexity over validation blocks, overall and per topic.

    PPL = exp(Σ NLL / Σ predicted tokens) (paper §4.1). Blocks are right-padded within a batch;
    with causal attention a real token never sees the padding after it, and padded positions
    are not scored.

    Returns:
        {"ppl", "nll", "tokens", "per_topic": {topic: ppl}, "per_topic_tokens": {topic: n}}.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = model_device(model)
    nll_by_topic: dict[str, float] = {}
    tokens_by_topic: dict[str, int] = {}
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = blocks[start : start + batch_size]
        nll, scored = _token_nll(model, [block for _, block in chunk], device)
        for row, (topic, _) in enumerate(chunk):
            nll_by_topic[topic] = nll_by_topic.get(topic, 0.0) + float(nll[row][scored[row]].double().sum())
            tokens_by_topic[topic] = tokens_by_topic.get(topic, 0) + int(scored[row].sum())
    model.train(was_training)
    total_nll = sum(nll_by_topic.values())
    total_tokens = sum(tokens_by_topic.values())
    return {
        "ppl": math.exp(total_nll / max(total_tokens, 1)),
        "nll": total_nll / max(total_tokens, 1),
        "tokens": total_tokens,
        "per_topic": {t: math.exp(nll_by_topic[t] / max(tokens_by_topic[t], 1)) for t in sorted(nll_by_topic)},
        "per_topic_tokens": dict(sorted(tokens_by_topic.items())),
    }


def _token_nll(model: nn.Module, blocks: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL [B, T-1] of right-padded blocks, and which positions are real tokens [B, T-1]."""
    width = max(block.numel() for block in blocks)
    ids = torch.zeros(len(blocks), width, dtype=torch.long)
    mask = torch.zeros(len(blocks), width, dtype=torch.bool)
    for row, block in enumerate(blocks):
        ids[row, : block.numel()] = block
        mask[row, : block.numel()] = True
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids).logits.float()  # [B, T, V]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(len(blocks), width - 1)
    return nll, mask[:, 1:]
