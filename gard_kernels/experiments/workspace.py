"""What every run of a grid shares, built once: the loaded model, the packed data, the base
model's evaluation and the run-independent facts metrics.json records."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .data import LMData, build_data, load_corpus
from .evaluation import evaluate
from .io import fingerprint, read_json, write_json
from .models import ModelSource, device_name, load_model, tokenizer_encoder
from .settings import TrainSettings


@dataclass
class Workspace:
    """What every run of a grid shares: model, data, and facts for metrics.json."""

    model: nn.Module
    data: LMData
    context: dict


def make_workspace(
    model: nn.Module,
    tokenizer,
    model_label: str,
    corpus: str,
    max_len: int,
    text_file: Optional[str] = None,
    val_fraction: float = 0.2,
    progress: bool = True,
    test_fraction: float = 0.2,
) -> Workspace:
    """Pack the corpus with the model's tokenizer and collect the run-independent context."""
    documents = load_corpus(corpus, text_file)
    encode, eos = tokenizer_encoder(tokenizer)
    label = f"text:{text_file}" if text_file else corpus
    data = build_data(documents, encode, eos, max_len, label, val_fraction=val_fraction, progress=progress, test_fraction=test_fraction)
    context = {
        "model": model_label,
        "corpus": label,
        "device": device_name(next(model.parameters()).device),
        "data": {**data.stats, "val_topic_names": data.val_topics, "test_topic_names": data.test_topics},
    }
    return Workspace(model, data, context)


def load_workspace(
    source: ModelSource,
    corpus: str,
    max_len: int,
    text_file: Optional[str] = None,
    progress: bool = True,
    byte_tokenizer: bool = False,
    test_fraction: float = 0.2,
    device: Optional[torch.device] = None,
    check: Optional[Callable[[nn.Module], None]] = None,
) -> Workspace:
    """Load the model (tqdm) onto `device` (default: the CPU) and build the workspace
    (test_fraction 0: the earlier two-way split). check(model), if given, runs right after the
    load, before the data is packed."""
    model, tokenizer = load_model(source, progress=progress, byte_tokenizer=byte_tokenizer, device=device)
    if check is not None:
        check(model)
    return make_workspace(model, tokenizer, source.label, corpus, max_len, text_file, progress=progress, test_fraction=test_fraction)


def base_evaluation(ws: Workspace, train: TrainSettings, out_dir: Optional[Path], progress: bool = True) -> dict:
    """Validation and test PPL of the unadapted model on the runs' subsets; cached in OUT/base.json."""
    key = fingerprint({
        "model": ws.context["model"], "data": ws.context["data"], "eval_blocks": train.eval_blocks,
        "test_blocks": train.test_blocks, "max_len": train.max_len,
    })
    path = Path(out_dir) / "base.json" if out_dir is not None else None
    if path is not None and path.is_file():
        cached = read_json(path)
        if cached.get("fingerprint") == key:
            ws.context["base_val_ppl"] = cached["ppl"]
            ws.context["base_test_ppl"] = cached.get("test_ppl")
            return cached
    tick = time.perf_counter()
    result = evaluate(ws.model, ws.data.eval_subset(train.eval_blocks), train.eval_batch_size, progress, desc="val base model")
    test = None
    if train.test_blocks != 0 and ws.data.test_blocks:
        test = evaluate(ws.model, ws.data.eval_subset(train.test_blocks, "test"), train.eval_batch_size, progress, desc="test base model")
    base = {
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "per_topic": result["per_topic"],
        "test_ppl": None if test is None else test["ppl"],
        "test_tokens": None if test is None else test["tokens"],
        "test_per_topic": None if test is None else test["per_topic"],
        "seconds": time.perf_counter() - tick,
        "fingerprint": key,
    }
    if path is not None:
        write_json(path, base)
    ws.context["base_val_ppl"] = base["ppl"]
    ws.context["base_test_ppl"] = base["test_ppl"]
    return base
