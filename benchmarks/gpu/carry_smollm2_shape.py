"""Write SmolLM2-135M's config and tokenizer (not its weights) to .gpu_carry/smollm2-shape/.

A lent GPU machine receives the working tree only (64 MiB), and the model's GGUF is 98 MB, so
run_all.sh trains a model of SmolLM2's shape with random weights and its real tokenizer there:
token counts, seconds and tokens/s are the real model's, the PPL is not. Run here, before the
device call, and name `.gpu_carry` in its `carry` list (the folder is git-ignored):
    python benchmarks/gpu/carry_smollm2_shape.py
"""
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from gard_kernels.experiments.models import default_model

OUT = Path(__file__).resolve().parents[2] / ".gpu_carry" / "smollm2-shape"

if __name__ == "__main__":
    source = default_model()
    OUT.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.gguf_file).save_pretrained(OUT)
    AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file).save_pretrained(OUT)
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir()) / 1e6:.1f} MB)")
