"""The baselines of the comparison, one file each; BASELINES is their registry.

Adding a baseline: write baselines/<name>.py with one method.Method subclass (the interface and
the order the training loop calls it in are documented in method.py), then add one line below.
Its key is the method's name on the command line (presets.METHODS lists it after the GARD
methods, with the shared bounds of every baseline).
"""
from __future__ import annotations

from ..method import Method
from .adalora import AdaLoraMethod
from .eva import EvaMethod
from .gora import GoraMethod
from .lora_ga import LoraGaMethod
from .uniform import UniformMethod

# Name -> the Method subclass, in the order tables and figures list them.
BASELINES: dict[str, type[Method]] = {
    "gora": GoraMethod,
    "eva": EvaMethod,
    "adalora": AdaLoraMethod,
    "uniform": UniformMethod,
    "lora-ga": LoraGaMethod,
}

__all__ = ["BASELINES", "AdaLoraMethod", "EvaMethod", "GoraMethod", "LoraGaMethod", "UniformMethod"]
