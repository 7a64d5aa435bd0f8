"""gard_kernels: gradient-spectral LoRA rank allocation with fused gradient-sketching kernels."""
from . import reference
from .allocate import allocate_ranks, clip_rank_change
from .budget import lora_budget
from .config import GARDConfig
from .controller import GARD
from .integrations.suggest import suggest_lora_config
from .ring import SketchRing
from .sketch import GradientSketch, available_backends
from .spectra import effective_rank, gram_eigenvalues, spectral_scores

# Reading a PEFT LoRA adapter into a new GARD run, under its earlier name.
load_adapter = GARD.from_pretrained

__version__ = "0.1.0"

__all__ = [
    "GARD",
    "GARDConfig",
    "GradientSketch",
    "SketchRing",
    "allocate_ranks",
    "available_backends",
    "clip_rank_change",
    "effective_rank",
    "gram_eigenvalues",
    "load_adapter",
    "lora_budget",
    "reference",
    "spectral_scores",
    "suggest_lora_config",
    "__version__",
]
