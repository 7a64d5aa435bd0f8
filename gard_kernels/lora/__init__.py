"""LoRA adapters whose rank changes in training: layer, capture Function, range finder, optimizer
state, manager, and their PEFT adapter format."""
from .capture import CaptureHandle, lora_capture
from .layer import LoRALayer, ResizeRecord, adapter_shape
from .manager import LoRAManager, find_targets, match_target_modules
from .range_finder import RangeFinder

__all__ = [
    "CaptureHandle",
    "LoRALayer",
    "LoRAManager",
    "RangeFinder",
    "ResizeRecord",
    "adapter_shape",
    "find_targets",
    "lora_capture",
    "match_target_modules",
]
