"""What the name of an adapted module says about where it sits in the model."""
from __future__ import annotations

from typing import Optional


def block_index(module_name: str) -> Optional[int]:
    """Transformer block of an adapted module: the last integer in its name (None: none).

    model.layers.12.self_attn.q_proj -> 12; lm_head -> None.
    """
    digits = [part for part in module_name.split(".") if part.isdigit()]
    return int(digits[-1]) if digits else None


def short_name(module_name: str) -> str:
    """model.layers.12.self_attn.q_proj -> 12.q_proj (its block and its own name)."""
    block = block_index(module_name)
    last = module_name.rsplit(".", 1)[-1]
    return last if block is None else f"{block}.{last}"
