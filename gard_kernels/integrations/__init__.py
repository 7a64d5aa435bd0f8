"""Integrations above the controller: the Hugging Face Trainer callback and PEFT rank suggestions.

`GARDCallback` is imported on first use, so `gard_kernels` never imports transformers itself.
The PEFT adapter format itself is lora/peft_format.py (GARD.save_pretrained / from_pretrained).
"""
from .suggest import suggest_lora_config

__all__ = ["GARDCallback", "suggest_lora_config"]


def __getattr__(name):
    if name == "GARDCallback":
        from .hf_trainer import GARDCallback

        return GARDCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
