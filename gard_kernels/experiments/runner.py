"""One fine-tuning run: the shared training loop, evaluation, and metrics.json.

Every method runs through `finetune`: the same batches in the same order for a seed, AdamW with
the same learning rate and schedule (linear warm-up, cosine decay to 10 %), gradient clipping,
the same precision mode and the same evaluation (validation for choices, test for reporting).
The base model is deep-copied per run, so one loaded model serves a whole grid.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .data import LMData, train_batches
from .methods import BASELINE_OPTIONS, METHODS, GardMethod, GardSettings, block_index, build_method

PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainSettings:
    """Training and evaluation settings shared by every method of a comparison.

    Args:
        lr: AdamW learning rate (peak), the same for every method of a grid (a sweep varies it).
            1e-2 is the rate the study chose on validation for the recommended `gard` at every
            budget (docs/results.md); the earlier grids used 3e-3.
        batch_size: blocks per optimizer step.
        steps: optimizer steps (>= 100 for the study: docs/results.md).
        max_len: tokens per block.
        warmup_ratio: fraction of steps of linear warm-up (at least one step).
        weight_decay: AdamW weight decay.
        grad_clip: max global norm of the adapter gradients (0: off).
        eval_blocks: validation blocks evaluated (round-robin over topics); None: all.
        eval_batch_size: blocks per evaluation forward pass.
        eval_every: also evaluate every this many steps (0: only at the end); the best
            evaluation is the run's primary metric.
        test_blocks: test blocks evaluated once, on the final model (round-robin over topics);
            None: all; 0: no test evaluation.
        precision: the training step's precision: "fp32", or "bf16" (forward under CPU / CUDA
            bf16 autocast, adapters and optimizer state in float32). Evaluation always runs in
            float32, so perplexities of both modes are measured the same way.
        compile: run the training forward through torch.compile (evaluation stays eager).
    """

    lr: float = 1e-2
    batch_size: int = 4
    steps: int = 100
    max_len: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_blocks: Optional[int] = 64
    eval_batch_size: int = 8
    eval_every: int = 0
    test_blocks: Optional[int] = 64
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_context(precision: str, device: torch.device):
    """The context a training forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [B, T] block batch (plus any loss the model adds,
    e.g. AdaLoRA's orthogonality penalty). The batch moves to the model's device."""
    batch = batch.to(_model_device(model))
    return model(input_ids=batch, labels=batch).loss


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    device = _model_device(model)
    nll_by_topic: dict[str, float] = {}
    tokens_by_topic: dict[str, int] = {}
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = blocks[start : start + batch_size]
        width = max(block.numel() for _, block in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, (_, block) in enumerate(chunk):
            ids[row, : block.numel()] = block
            mask[row, : block.numel()] = True
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(chunk), width - 1)
        scored = mask[:, 1:]
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


def _schedule(steps: int, warmup_ratio: float):
    warm = max(1, round(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def fingerprint(spec: dict) -> str:
    """Short stable hash of a run's full specification (used to resume grids safely)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically: a crash never leaves a half-written file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_spec(method: str, budget: int, seed: int, train: TrainSettings, gard: GardSettings, context: dict) -> dict:
    """Everything that determines a run's result, as one dict (its fingerprint is the resume key)."""
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "train": train.to_dict(),
        # Resolved options (preset and GARDConfig defaults included): a changed default is a new
        # GARD run; the other methods depend only on the bounds they read.
        "gard": _options_read_by(method, gard),
        "model": context.get("model"),
        "corpus": context.get("corpus"),
        "data": context.get("data"),
    }


def _options_read_by(method: str, gard: GardSettings) -> dict:
    options = gard.options(method)
    if METHODS.get(method, {}).get("kind") == "gard":
        return options
    return {name: options[name] for name in BASELINE_OPTIONS}


def finetune(
    method_name: str,
    budget: int,
    seed: int,
    base_model: nn.Module,
    data: LMData,
    train: TrainSettings,
    gard: GardSettings,
    out_dir: Optional[Path] = None,
    context: Optional[dict] = None,
    progress: bool = False,
    variant: Optional[dict] = None,
) -> dict[str, Any]:
    """Fine-tune a copy of `base_model` with one method; returns (and writes) the metrics.

    Args:
        method_name: a key of methods.METHODS.
        budget: LoRA parameter budget.
        seed: adapter init, data order and GARD's projections.
        base_model: the frozen model; not modified.
        data: packed data (train, validation and test blocks).
        train, gard: shared settings.
        out_dir: where metrics.json goes (None: not written).
        context: run-independent facts (model label, device, versions, base PPL, ...).
        progress: tqdm bars.
        variant: ablation overrides applied to `gard` (recorded in metrics).
    Returns:
        The metrics dict of metrics.json: best_mean_val_ppl (= primary_metric, the number choices
        are made on), test_ppl (final model), train_seconds (profiling + optimizer steps, no
        evaluation), tokens_per_second (training tokens / train_seconds), backprop_blocks (how
        many transformer blocks the backward pass reaches: from the earliest adapted module with
        rank > 0, or capturing, to the top; max and mean over steps) and everything else.
    """
    from tqdm.auto import tqdm

    from .. import __version__

    context = dict(context or {})
    spec = run_spec(method_name, budget, seed, train, gard, context)
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    method = build_method(method_name, model, budget, gard, seed, train.steps, lr=train.lr)
    params = method.parameters()
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(train.steps, train.warmup_ratio))
    method.attach(optimizer)
    batches = train_batches(data, train.batch_size, train.steps, seed)
    eval_set = data.eval_subset(train.eval_blocks)
    names = list(method.ranks())
    blocks = [block_index(n) for n in names]
    known_blocks = [b for b in blocks if b is not None]
    top_block = max(known_blocks) if known_blocks else 0
    device = _model_device(base_model)
    precision = autocast_context(train.precision, device)
    # Compiled for the training forward only: evaluation runs the eager model in float32.
    train_model = torch.compile(method.model) if train.compile else method.model

    start = time.perf_counter()
    method.model.train()

    def prepare_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Forward under the run's precision; the caller's backward runs outside autocast, as in
        # the training steps (PyTorch's recommended pattern).
        with autocast_context(train.precision, device):
            return lm_loss(model, batch)

    method.prepare(batches, prepare_loss, progress)
    profile_seconds = time.perf_counter() - start
    history: list[dict] = []
    evals: list[dict] = []
    eval_seconds = 0.0
    params_sum = 0
    depth = []
    bar = tqdm(batches, desc=f"{method_name} b={budget} s={seed}", unit="step", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        in_use = method.num_params()
        params_sum += in_use
        reached = [blocks[names.index(n)] for n in method.backprop_modules() if n in names]
        reached = [b for b in reached if b is not None]
        depth.append(top_block + 1 - min(reached) if reached else 0)
        with precision:
            loss = lm_loss(train_model, batch)
        # A method may adapt nothing at a step (no rank anywhere): then nothing trains.
        if loss.requires_grad:
            loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        method.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
        ranks_now = method.ranks()
        record = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "lr": lr,
            "params": in_use,
            "params_after": method.num_params(),
            "ranks": [ranks_now[n] for n in names],
            "backprop_blocks": depth[-1],
            "elapsed": time.perf_counter() - start,
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", params=record["params_after"])
        if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < train.steps:
            tick = time.perf_counter()
            result = evaluate(method.model, eval_set, train.eval_batch_size, progress, desc="val")
            eval_seconds += time.perf_counter() - tick
            evals.append({"step": step + 1, **result})
            method.model.train()
    train_seconds = time.perf_counter() - start - eval_seconds
    tick = time.perf_counter()
    result = evaluate(method.model, eval_set, train.eval_batch_size, progress, desc=f"val {method_name}")
    evals.append({"step": train.steps, **result})
    test = None
    if train.test_blocks != 0 and data.test_blocks:
        test = evaluate(method.model, data.eval_subset(train.test_blocks, "test"), train.eval_batch_size, progress, desc=f"test {method_name}")
    eval_seconds += time.perf_counter() - tick
    total = time.perf_counter() - start

    best = min(evals, key=lambda e: e["ppl"])
    reallocations = []
    if isinstance(method, GardMethod):
        for entry in method.history:
            if "reallocation" in entry:
                event = dict(entry["reallocation"])
                event["profile"] = bool(entry.get("profile", False))
                reallocations.append(event)
    final_ranks = method.ranks()
    train_tokens = train.steps * train.batch_size * train.max_len
    resolved = gard.options(method_name)
    metrics = {
        "primary_metric": best["ppl"],
        "best_mean_val_ppl": best["ppl"],
        "final_val_ppl": evals[-1]["ppl"],
        "test_ppl": None if test is None else test["ppl"],
        "test_tokens": None if test is None else test["tokens"],
        "best_step": best["step"],
        "lora_params_mean": params_sum / max(train.steps, 1),
        "lora_params_final": method.num_params(),
        "total_elapsed_seconds": total,
        "train_seconds": train_seconds,
        "profile_seconds": profile_seconds,
        "eval_seconds": eval_seconds,
        "train_tokens": train_tokens,
        "tokens_per_second": train_tokens / train_seconds if train_seconds > 0 else None,
        "backprop_blocks_max": max(depth) if depth else 0,
        "backprop_blocks_mean": sum(depth) / len(depth) if depth else 0.0,
        "blocks_total": top_block + 1,
        "method": method_name,
        "budget": budget,
        "seed": seed,
        "variant": dict(variant or {}),
        "hyperparameters": {
            **train.to_dict(),
            "budget": budget,
            "seed": seed,
            **{k: v for k, v in resolved.items()},
        },
        "method_details": method.details,
        "device": context.get("device"),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": context.get("model"),
        "corpus": context.get("corpus"),
        "data": context.get("data"),
        "base_val_ppl": context.get("base_val_ppl"),
        "base_test_ppl": context.get("base_test_ppl"),
        "adapted_modules": names,
        "final_ranks": final_ranks,
        "val_history": [{"step": e["step"], "ppl": e["ppl"], "tokens": e["tokens"]} for e in evals],
        "per_topic_val_ppl": best["per_topic"],
        "per_topic_tokens": best["per_topic_tokens"],
        "per_topic_test_ppl": None if test is None else test["per_topic"],
        "reallocations": reallocations,
        "history": history,
        "fingerprint": fingerprint(spec),
    }
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
