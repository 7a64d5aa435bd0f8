"""Which sketch backends are usable here, and which one `backend="auto"` runs.

`auto` measures: the first call for a (device type, dtype, size bucket) times every usable fast
backend on the real inputs and keeps the fastest for later calls with the same key. The
reference is never a candidate, and neither is Triton on the CPU (its interpreter is for tests).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

ALL_BACKENDS = ("reference", "torch", "cpp", "triton", "cuda")
# What a caller may ask for: a backend, or "auto" (measure and pick; see choose_auto).
BACKEND_CHOICES = ("auto", *ALL_BACKENDS)

_auto_choice: dict[tuple, str] = {}


def _triton_usable(device_type: str) -> bool:
    from . import triton_impl

    if not triton_impl.is_available():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def backend_usable(name: str, device_type: str) -> bool:
    """Whether `name` can run on inputs living on `device_type` ("cpu", "cuda", ...)."""
    from . import native

    if name in ("reference", "torch"):
        return True
    if name == "cpp":
        return device_type == "cpu" and native.is_available("cpu")
    if name == "cuda":
        return device_type == "cuda" and native.is_available("cuda")
    if name == "triton":
        return _triton_usable(device_type)
    raise ValueError(f"unknown sketch backend {name!r}; choose one of {BACKEND_CHOICES}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for inputs on `device` (default: every device this machine has)."""
    if device is None:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        device_types = [torch.device(device).type]
    return [name for name in ALL_BACKENDS if any(backend_usable(name, t) for t in device_types)]


def _size_bucket(n: int) -> int:
    return max(n, 1).bit_length()


def _candidates(device_type: str) -> list[str]:
    if device_type == "cuda":
        order = ["triton", "cuda", "torch"]
    elif device_type == "cpu":
        order = ["cpp", "torch"]
    else:
        order = ["torch"]
    return [name for name in order if backend_usable(name, device_type)]


def choose_auto(x: torch.Tensor, dy: torch.Tensor, run: Callable[[str], None]) -> str:
    """Backend for these inputs; measures the candidates once per key with `run(name)`."""
    key = (x.device.type, x.dtype, _size_bucket(x.shape[0]), _size_bucket(x.shape[1]), _size_bucket(dy.shape[1]))
    if key in _auto_choice:
        return _auto_choice[key]
    candidates = _candidates(x.device.type)
    if len(candidates) == 1:
        _auto_choice[key] = candidates[0]
        return candidates[0]
    timings = {}
    for name in candidates:
        run(name)  # warm-up: JIT builds, Triton compiles, caches
        _synchronize(x.device)
        start = time.perf_counter()
        for _ in range(3):
            run(name)
        _synchronize(x.device)
        timings[name] = time.perf_counter() - start
    _auto_choice[key] = min(timings, key=timings.get)
    return _auto_choice[key]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
