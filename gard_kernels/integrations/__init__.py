"""Integrations: Hugging Face Trainer callback, PEFT-format export and import.

`GARDCallback` is imported on first use, so `gard_kernels` never imports transformers itself.
"""
from .peft_export import load_adapter, save_pretrained

__all__ = ["GARDCallback", "load_adapter", "save_pretrained"]


def __getattr__(name):
    if name == "GARDCallback":
        from .hf_trainer import GARDCallback

        return GARDCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
