"""The gradient sketch op: GradientSketch (gradient_sketch.py) and its backends side by side
(reference in ../reference.py, torch_impl.py, native.py for the C++ / CUDA kernels, triton_impl.py),
the one sign hash (hashing.py) and the backend choice (dispatch.py)."""
from __future__ import annotations

from .dispatch import available_backends
from .gradient_sketch import GradientSketch

__all__ = ["GradientSketch", "available_backends"]
