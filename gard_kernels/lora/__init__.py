"""LoRA adapters whose rank changes in training: layer, capture Function, optimizer state, manager."""
from .capture import CaptureHandle, lora_capture
from .layer import LoRALayer, ResizeRecord
from .manager import LoRAManager, match_target_modules

__all__ = ["CaptureHandle", "LoRALayer", "LoRAManager", "ResizeRecord", "lora_capture", "match_target_modules"]
