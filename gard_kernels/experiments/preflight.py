"""Checks of a command line's runs that need the model's layer names and shapes but not its
weights, made before the model loads (about 30 s for SmolLM2 on a 2-core CPU).

They run on a skeleton of the model: the modules its config describes, built on the meta device
(no memory, no weights), which have the loaded model's names and shapes. Not for a .gguf file:
its config is read by parsing the file's whole header (the tokenizer's vocabulary included),
about 9 s for SmolLM2's, which every correct run would pay; those runs are checked right after
the load instead, before the data is packed (workspace.load_workspace's `check`).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

from ..lora.manager import ALL_LINEAR_SHORTHAND, is_all_linear
from .compare import GridRun, check_budgets
from .models import ModelSource

# A --target-modules value made only of these is a module name (or a suffix of one).
_PLAIN_NAME = re.compile(r"[\w.]+")


def target_modules_argument(values: Sequence[str]) -> Union[list[str], str]:
    """--target-modules as GARDConfig takes it: names / suffixes as a list, PEFT's "all-linear"
    shorthand as that string, or one value that is not a plain name (any character besides letters,
    digits, "_" and ".") as a regular expression.

    Raises:
        ValueError: an invalid regular expression, or "all-linear" or a regular expression given
            beside other values.
    """
    values = list(values)
    shorthand = [v for v in values if is_all_linear(v)]
    if shorthand:
        if len(values) > 1:
            raise ValueError(
                f"--target-modules {' '.join(values)}: {shorthand[0]!r} (every linear layer but the output layer) "
                f"must be the only value: --target-modules {ALL_LINEAR_SHORTHAND}, or give module names only"
            )
        return values[0]
    patterns = [v for v in values if not _PLAIN_NAME.fullmatch(v)]
    if not patterns:
        return values
    if len(values) > 1:
        raise ValueError(
            f"--target-modules {' '.join(values)}: {patterns[0]!r} is a regular expression, which must be the only "
            "value (e.g. '.*\\.(q|v)_proj'); or give plain module names / suffixes (q_proj v_proj)"
        )
    try:
        re.compile(values[0])
    except re.error as error:
        raise ValueError(f"--target-modules {values[0]!r} is not a valid regular expression: {error}") from None
    return values[0]


def skeleton_model(source: ModelSource) -> Optional[nn.Module]:
    """The modules of `source`'s model with their shapes and no weights (meta device), or None when
    its config cannot be read that way (the real load then reports what is wrong)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(str(source.directory), **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # any failure only means this early check cannot run; the load decides
        return None


def check_runs_before_loading(source: ModelSource, runs: Sequence[GridRun]) -> None:
    """Refuse runs whose target modules match nothing or whose budget is below what the method
    needs on this model, before its weights load.

    Raises:
        ValueError: one line, naming the budget, method and target modules (compare.check_budgets),
            or the target modules and the adaptable module names (lora.manager.find_targets).
    """
    model = skeleton_model(source) if runs and not source.gguf_file else None
    if model is not None:
        check_budgets(model, runs)
