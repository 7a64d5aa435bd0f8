"""The base layers GARD adapts: their shapes, how PEFT adds a LoRA term to them, dense copies.

nn.Linear (weight [d_out, d_in]), transformers' Conv1D (weight [d_in, d_out]) and the
bitsandbytes quantised Linear subclasses: Linear4bit (NF4 / FP4, QLoRA) and Linear8bitLt
(LLM.int8). A quantised layer's weight tensor does not have the layer's shape (Linear4bit packs
two 4-bit codes per byte into a [d_in * d_out / 2, 1] buffer), so shapes come from the declared
in_features / out_features, checked against the quantisation state. bitsandbytes is never
imported here: its layers are recognised by class name, and its functions are reached through
the module of a layer that already exists.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["adapter_shape", "dense_weight", "dequantized_bases", "is_quantized", "lora_added_in_output_dtype"]

# bitsandbytes' quantised Linear classes (subclasses of nn.Linear), by name: LinearNF4 and
# LinearFP4 derive from Linear4bit, and the checks walk the MRO.
_BNB_4BIT = "Linear4bit"
_BNB_8BIT = "Linear8bitLt"


def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D (weight [d_in, d_out]), recognised by name so that
    # transformers is never imported here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _bnb_kind(module: nn.Module) -> str | None:
    """The kind of a bitsandbytes quantised Linear ("4bit" or "8bit"), None for any other module."""
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] != "bitsandbytes":
            continue
        if cls.__name__ == _BNB_4BIT:
            return "4bit"
        if cls.__name__ == _BNB_8BIT:
            return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes Linear4bit / Linear8bitLt (quantised or about to be)."""
    return _bnb_kind(module) is not None


def lora_added_in_output_dtype(module: nn.Module) -> bool:
    """Whether PEFT casts the LoRA term to the base output's dtype before adding it.

    PEFT's bitsandbytes LoRA layers do (result + (B A x * s).to(result.dtype)); its plain Linear /
    Conv1D layer adds the float32 term to the bf16 / fp16 result and casts the sum once. GARD adds
    the same way, so a PEFT reload of an exported adapter computes the same logits.
    """
    return is_quantized(module)


def _unsupported(module: nn.Module, why: str) -> TypeError:
    return TypeError(
        f"GARD cannot read the shape of a {type(module).__module__}.{type(module).__name__}: {why}. GARD adapts "
        "nn.Linear, transformers Conv1D and bitsandbytes Linear4bit / Linear8bitLt (load the model with "
        "transformers' BitsAndBytesConfig for QLoRA); for other quantised layers (GPTQ, AWQ, HQQ, ...) "
        "leave them out of target_modules or load the model unquantised"
    )


def adapter_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable layer, from its declared features.

    Raises:
        TypeError: a module GARD does not adapt (naming its type), e.g. a GPTQ / AWQ layer, or an
            nn.Linear subclass whose weight does not have the declared [out_features, in_features]
            shape and whose quantisation GARD does not know.
    """
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    if not isinstance(module, nn.Linear):
        raise _unsupported(module, "it is not an nn.Linear")
    d_in, d_out = module.in_features, module.out_features
    weight = module.weight
    kind = _bnb_kind(module)
    if kind == "4bit":
        quant_state = getattr(weight, "quant_state", None)
        # Before quantisation (on the meta device, or before .to(device)) the weight is still dense.
        stored = tuple(quant_state.shape) if quant_state is not None else tuple(weight.shape)
    else:
        # Linear8bitLt keeps its int8 codes in the [d_out, d_in] layout of the dense weight.
        stored = tuple(weight.shape)
    if stored != (d_out, d_in):
        raise _unsupported(
            module,
            f"its weight is stored as {tuple(weight.shape)} {weight.dtype}, not as the declared "
            f"[out_features, in_features] = [{d_out}, {d_in}]",
        )
    return d_in, d_out


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float tensor in Linear layout [d_out, d_in]: for a quantised
    layer a new, dequantised tensor (for NF4 / FP4 exactly the one its CPU forward multiplies
    by), otherwise a detached view.

    Raises:
        TypeError: integer codes without the scales to dequantise them.
    """
    weight = module.weight.detach()
    if is_conv1d(module):
        return weight.T
    kind = _bnb_kind(module)
    if kind is None:
        return weight
    functional = sys.modules["bitsandbytes"].functional
    quant_state = getattr(module.weight, "quant_state", None)
    if kind == "4bit" and quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            # An eval-mode forward on some CPUs (AVX512-BF16) repacked the codes for bitsandbytes'
            # CPU kernel; the inverse gives the standard layout dequantize_4bit reads.
            weight, quant_state = functional._convert_weight_packed_for_cpu_inverse(weight, quant_state)
        return functional.dequantize_4bit(weight, quant_state)
    scales = getattr(module.weight, "SCB", None)
    if kind == "8bit" and scales is not None and weight.dtype == torch.int8:
        # LLM.int8 row-wise absmax codes: w = code * SCB / 127.
        return functional.int8_vectorwise_dequant(weight, scales)
    if not weight.is_floating_point():
        raise TypeError(f"{type(module).__name__} holds {weight.dtype} codes without their quantisation state")
    # Not quantised yet (bitsandbytes quantises on the move to a device): still the dense weight.
    return weight


@contextlib.contextmanager
def dequantized_bases(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, each LoRA layer's quantised base is a dense nn.Linear copy (frozen).

    For code that needs the gradient or the values of a base weight (GoRA's profiling): a
    quantised weight is an integer tensor, which can neither require a gradient nor be read as
    values. Every dense copy costs 4 bytes per weight (2 for a bf16 compute dtype); only the
    given layers are copied. The original modules are back on exit, also after an exception.

    Args:
        layers: LoRALayer modules (anything with a `base` attribute).
    """
    originals = []
    try:
        for layer in layers:
            base = layer.base
            if not is_quantized(base):
                continue
            weight = dense_weight(base)
            dtype = getattr(base, "compute_dtype", None) or weight.dtype
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=weight.device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            originals.append((layer, base))
            layer.base = dense
        yield
    finally:
        for layer, base in originals:
            layer.base = base
