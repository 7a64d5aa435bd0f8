"""One fine-tuning run: the shared training loop, then the final evaluation and metrics.json.

Every method runs through `finetune`: the same batches in the same order for a seed, AdamW with
the same learning rate and schedule (linear warm-up, cosine decay to 10 %), gradient clipping,
the same precision mode and the same evaluation (validation for choices, test for reporting).
The base model is deep-copied per run, so one loaded model serves a whole grid.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .data import LMData, train_batches
from .evaluation import autocast_context, evaluate, lm_loss, model_device
from .io import fingerprint, run_spec, write_json
from .method import Method, MethodRun
from .metrics import Trace, run_metrics
from .module_names import block_index
from .presets import build_method, method_options
from .settings import GardSettings, TrainSettings


def lr_factor(steps: int, warmup_ratio: float):
    """The learning-rate multiplier of step `step`: linear warm-up over max(1, round(warmup_ratio *
    steps)) steps, then cosine decay to 10 % at the last step."""
    warm = max(1, round(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


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
        method_name: a method of presets.METHODS (or a legacy name).
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
        The metrics dict of metrics.json (metrics.run_metrics lists what it holds).
    """
    context = dict(context or {})
    spec = run_spec(method_name, budget, seed, train, gard, context)
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    run = MethodRun(method_name, model, budget, gard, seed, train.steps, train.lr, method_options(method_name))
    method = build_method(run)
    batches = train_batches(data, train.batch_size, train.steps, seed)
    eval_set = data.eval_subset(train.eval_blocks)
    trace = train_loop(method, batches, train, eval_set, model_device(base_model), progress, f"{method_name} b={budget} s={seed}")
    tick = time.perf_counter()
    result = evaluate(method.model, eval_set, train.eval_batch_size, progress, desc=f"val {method_name}")
    trace.evals.append({"step": train.steps, **result})
    test = None
    if train.test_blocks != 0 and data.test_blocks:
        test = evaluate(method.model, data.eval_subset(train.test_blocks, "test"), train.eval_batch_size, progress, desc=f"test {method_name}")
    trace.eval_seconds += time.perf_counter() - tick
    metrics = run_metrics(run, method, trace, test, train, context, variant)
    metrics["fingerprint"] = fingerprint(spec)
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def train_loop(
    method: Method,
    batches: Sequence[torch.Tensor],
    train: TrainSettings,
    eval_set: Sequence[tuple[str, torch.Tensor]],
    device: torch.device,
    progress: bool = False,
    label: str = "train",
) -> Trace:
    """AdamW over `batches` with the method's hooks (method.py), evaluating every
    train.eval_every steps; the final evaluation is the caller's."""
    from tqdm.auto import tqdm

    params = method.parameters()
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train.steps, train.warmup_ratio))
    method.attach(optimizer)
    names = list(method.ranks())
    # Compiled for the training forward only: evaluation runs the eager model in float32.
    train_model = torch.compile(method.model) if train.compile else method.model
    trace = Trace(names, [block_index(n) for n in names])
    method.model.train()

    def prepare_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Forward under the run's precision; the caller's backward runs outside autocast, as in
        # the training steps (PyTorch's recommended pattern).
        with autocast_context(train.precision, device):
            return lm_loss(model, batch)

    trace.profile_memory.start()
    method.prepare(batches, prepare_loss, progress)
    trace.profile_memory.stop()
    trace.profile_seconds = time.perf_counter() - trace.start
    trace.train_memory.start()
    bar = tqdm(batches, desc=label, unit="step", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        record = _train_step(method, train_model, batch, step, optimizer, scheduler, params, train, device, trace)
        bar.set_postfix(loss=f"{record['loss']:.3f}", params=record["params_after"])
        if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < train.steps:
            tick = time.perf_counter()
            result = evaluate(method.model, eval_set, train.eval_batch_size, progress, desc="val")
            trace.eval_seconds += time.perf_counter() - tick
            trace.evals.append({"step": step + 1, **result})
            method.model.train()
    trace.train_memory.stop()
    trace.train_seconds = time.perf_counter() - trace.start - trace.eval_seconds
    return trace


def _train_step(method, train_model, batch, step, optimizer, scheduler, params, train, device, trace: Trace) -> dict:
    """One optimizer step; appends its record to trace.history and returns it."""
    in_use = method.num_params()
    trace.params_sum += in_use
    trace.depth.append(trace.backprop_depth(method.backprop_modules()))
    with autocast_context(train.precision, device):
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
        "ranks": [ranks_now[n] for n in trace.names],
        "backprop_blocks": trace.depth[-1],
        "elapsed": time.perf_counter() - trace.start,
    }
    trace.history.append(record)
    return record
