"""The input dtypes every sketch backend takes (the sketch itself is accumulated in float32)."""
from __future__ import annotations

import torch

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
