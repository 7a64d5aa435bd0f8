"""GPU measurements for benchmarks/gpu/run_all.sh, printed as one short table.

Usage: python benchmarks/gpu/measure.py RESULTS_DIR [--dry-run]
--dry-run runs the same code paths on the CPU with tiny shapes (Triton under its interpreter),
so the script is known to work before scarce GPU time is spent on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import gard_kernels as gk

FULL_SKETCH_SHAPES = {
    "N8192-d4096": (8192, 4096, 4096),
    "smollm2-q_proj": (4096, 576, 576),
    "smollm2-v_proj": (4096, 576, 192),
    "smollm2-down_proj": (4096, 1536, 576),
}
DRY_SKETCH_SHAPES = {"dry-N64-d48": (64, 48, 40)}


def time_call(fn, device: torch.device, reps: int = 20) -> float:
    """Median seconds of fn() (triton's do_bench on CUDA; perf_counter otherwise)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(max(reps // 4, 3)):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def sketch_rows(device, dtype, shapes, bandwidth):
    rows = []
    for name, (n, d_in, d_out) in shapes.items():
        x = torch.randn(n, d_in, device=device, dtype=dtype)
        dy = torch.randn(n, d_out, device=device, dtype=dtype)
        sk = gk.GradientSketch(d_in, d_out, 16, 16, seed=0)
        p_in, p_out = sk.projections(device)
        p_in_t, p_out_t = p_in.to(dtype), p_out.to(dtype)
        torch_seconds = time_call(lambda: (dy @ p_out_t).float().T @ (x @ p_in_t).float(), device)
        moved = (x.numel() + dy.numel()) * x.element_size()
        for backend in ("triton", "cuda"):
            if backend not in gk.available_backends(device):
                rows.append({"op": f"sketch {name} {backend}", "status": "unavailable"})
                continue
            out = torch.zeros(16, 16, device=device)
            seconds = time_call(lambda: sk(x, dy, out=out, backend=backend), device)
            rows.append({
                "op": f"sketch {name} {backend}",
                "ms": seconds * 1e3,
                "fraction_of_copy_bw": moved / seconds / bandwidth,
                "speedup_vs_torch": torch_seconds / seconds,
            })
    return rows


def spectra_row(device, shape):
    sketches = torch.randn(*shape, device=device)
    batched = time_call(lambda: gk.gram_eigenvalues(sketches), device, reps=8)

    def loop():
        for layer in sketches:
            s = layer.double()
            torch.linalg.eigvalsh(s @ s.T)

    looped = time_call(loop, device, reps=4)
    return {"op": f"gram_eigenvalues {list(shape)}", "ms": batched * 1e3, "speedup_vs_loop": looped / batched}


def train_step_row(device, dry_run: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152)
    batch, seq = 8, 512
    if dry_run:
        spec.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
        batch, seq = 2, 16
    results = {}
    for variant in ("plain", "gard"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=seq, **spec)).to(device).eval()
        cfg = gk.GARDConfig(budget=57_600 if not dry_run else 2_000, target_modules=["q_proj", "v_proj"],
                            window=8, interval=8, warmup=8, score="uniform")
        gard = gk.GARD(model, cfg)
        opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-4)
        gard.attach_optimizer(opt)
        ids = torch.randint(0, spec["vocab_size"], (batch, seq), device=device)

        def step(with_gard=variant == "gard"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if with_gard:
                gard.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(9):
            step(True)
        if variant == "plain":
            for handle in gard.handles:
                handle.out = None
        results[variant] = time_call(step, device, reps=12)
    return {"op": "train step smollm2-135m", "ms": results["gard"] * 1e3, "ratio_vs_plain_lora": results["gard"] / results["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results_dir")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a CPU machine")
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter has no bf16
    bandwidth = copy_bandwidth(device, 1 << 20 if args.dry_run else 1 << 30)
    rows = [{"op": "device copy bandwidth", "GB/s": bandwidth / 1e9}]
    rows += sketch_rows(device, dtype, DRY_SKETCH_SHAPES if args.dry_run else FULL_SKETCH_SHAPES, bandwidth)
    rows.append(spectra_row(device, (6, 8, 16) if args.dry_run else (210, 32, 256)))
    rows.append(train_step_row(device, args.dry_run))
    with open(os.path.join(args.results_dir, "measurements.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    for row in rows:
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
