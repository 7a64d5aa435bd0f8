"""gard_kernels: gradient-spectral LoRA rank allocation with fused sketching kernels."""
from . import reference
from .sketch import GradientSketch, available_backends

__version__ = "0.1.0"

__all__ = ["GradientSketch", "available_backends", "reference", "__version__"]
