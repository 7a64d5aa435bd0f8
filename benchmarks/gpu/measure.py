"""GPU measurements for benchmarks/gpu/run_all.sh, printed as one short table.

Usage: python benchmarks/gpu/measure.py RESULTS_DIR [--dry-run]
--dry-run runs the same code paths on the CPU with tiny shapes (Triton under its interpreter),
so the script is known to work before scarce GPU time is spent on it.

Each sketch row carries its roofline (benchmarks/gpu/roofline.py): `bound_us` is the lower-bound
time at the GPU's datasheet bandwidth and peaks, `x_bound` = measured / bound (1.0 is the limit),
and `of_copy_bw` the fraction of the copy bandwidth measured in the same run (goal >= 0.70 for
bf16 at N8192-d4096). A GPU without a datasheet entry is bounded by the measured copy bandwidth;
the dry run uses the H200's numbers so the code path runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import gard_kernels as gk
from gard_kernels.sketch.triton_impl import sketch_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import GPUS, ROOFLINE_SHAPES, GPU, bound_seconds, match_gpu, sketch_cost  # noqa: E402

# The roofline's shapes (benchmarks/shapes.py plus N8192-d4096), so docs and GPU rows agree.
FULL_SKETCH_SHAPES = {name: (s["n"], s["d_in"], s["d_out"]) for name, s in ROOFLINE_SHAPES.items()}
DRY_SKETCH_SHAPES = {"dry-N64-d48": (64, 48, 40)}
TRITON_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def graph_seconds(fn, device: torch.device, rep_ms: int = 100) -> float | None:
    """Median seconds of fn() replayed from a CUDA graph: the GPU's time without Python's launch
    overhead (None off CUDA, or when fn cannot be captured)."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") / 1e3
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the eager time stands
        print(f"graph capture failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def roofline_gpu(device: torch.device, copy_bw: float, dry_run: bool) -> GPU:
    """Datasheet entry of this GPU; else one bounded by the copy bandwidth measured here."""
    if dry_run:
        return GPUS["H200"]
    name = torch.cuda.get_device_name(device)
    return match_gpu(name) or GPU(f"{name} (copy bw)", copy_bw, float("inf"), float("inf"), "measured copy bandwidth")


def sketch_rows(device, dtype, shapes, bandwidth, gpu: GPU):
    rows = []
    for name, (n, d_in, d_out) in shapes.items():
        x = torch.randn(n, d_in, device=device, dtype=dtype)
        dy = torch.randn(n, d_out, device=device, dtype=dtype)
        sk = gk.GradientSketch(d_in, d_out, 16, 16, seed=0)
        p_in, p_out = sk.projections(device)
        p_in_t, p_out_t = p_in.to(dtype), p_out.to(dtype)
        torch_seconds = time_call(lambda: (dy @ p_out_t).float().T @ (x @ p_in_t).float(), device)
        moved = (x.numel() + dy.numel()) * x.element_size()
        bound = bound_seconds(sketch_cost(n, d_in, d_out, 16, 16, TRITON_NAMES[dtype]), gpu, TRITON_NAMES[dtype])
        torch_graph = graph_seconds(lambda: (dy @ p_out_t).float().T @ (x @ p_in_t).float(), device)
        candidates = {
            "triton": lambda out: sk(x, dy, out=out, backend="triton"),
            "triton-split": lambda out: sketch_triton(x, dy, sk.key_in, sk.key_out, 16, 16, sk.scale, out, False, algorithm="split"),
            "cuda": lambda out: sk(x, dy, out=out, backend="cuda"),
        }
        for label, call in candidates.items():
            if label.split("-")[0] not in gk.available_backends(device):
                rows.append({"op": f"sketch {name} {label}", "status": "unavailable"})
                continue
            out = torch.zeros(16, 16, device=device)
            seconds = time_call(lambda: call(out), device)
            graph = graph_seconds(lambda: call(out), device)
            gpu_seconds = graph or seconds
            rows.append({
                "op": f"sketch {name} {label}",
                "ms": seconds * 1e3,
                # The GPU's own time (CUDA graph replay), and the roofline measured against it.
                "graph_ms": graph * 1e3 if graph else None,
                "bound_us": bound["bound"] * 1e6,
                "x_bound": gpu_seconds / bound["bound"],
                "of_copy_bw": moved / gpu_seconds / bandwidth,
                "speedup_vs_torch": (torch_graph or torch_seconds) / gpu_seconds,
            })
    return rows


def launch_sweep(device, dtype, shapes, bandwidth) -> list[dict]:
    """Graph-timed sketch_triton over launch configurations of both algorithms, to set the
    heuristics from measurements: (algorithm, block_n, block_d, warps, splits) -> GB/s."""
    import itertools

    rows = []
    fused = list(itertools.product(["fused"], (16, 32, 64, 128), (64, 128), (4, 8), [None]))
    split = list(itertools.product(["split"], (64, 128, 256), (64, 128), [8], (2, 4, 8, 16)))
    for name, (n, d_in, d_out) in shapes.items():
        x = torch.randn(n, d_in, device=device, dtype=dtype)
        dy = torch.randn(n, d_out, device=device, dtype=dtype)
        sk = gk.GradientSketch(d_in, d_out, 16, 16, seed=0)
        moved = (x.numel() + dy.numel()) * x.element_size()
        for algorithm, bn, bd, warps, splits in fused + split:
            out = torch.zeros(16, 16, device=device)
            launch = dict(algorithm=algorithm, block_n=bn, block_d=bd, num_warps=warps, splits=splits)

            def call():
                return sketch_triton(x, dy, sk.key_in, sk.key_out, 16, 16, sk.scale, out, False, **launch)

            try:
                call()
                seconds = graph_seconds(call, device, rep_ms=30) or time_call(call, device)
            except Exception as error:  # noqa: BLE001 - a config that does not compile is a result too
                rows.append({"op": f"sweep {name}", **launch, "error": f"{type(error).__name__}: {str(error)[:120]}"})
                continue
            rows.append({"op": f"sweep {name}", **launch, "us": seconds * 1e6, "of_copy_bw": moved / seconds / bandwidth})
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
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a CPU machine")
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter has no bf16
    bandwidth = copy_bandwidth(device, 1 << 20 if args.dry_run else 1 << 30)
    gpu = roofline_gpu(device, bandwidth, args.dry_run)
    rows = [{"op": "device copy bandwidth", "GB/s": bandwidth / 1e9, "roofline": gpu.name,
             "of_datasheet_bw": bandwidth / gpu.bandwidth}]
    rows += sketch_rows(device, dtype, DRY_SKETCH_SHAPES if args.dry_run else FULL_SKETCH_SHAPES, bandwidth, gpu)
    sweep_shapes = {"dry-N64-d48": (64, 48, 40)} if args.dry_run else {
        k: FULL_SKETCH_SHAPES[k] for k in ("N8192-d4096", "smollm2-q_proj", "smollm2-down_proj")}
    if not args.no_sweep:
        rows += launch_sweep(device, dtype, sweep_shapes, bandwidth)
    rows.append(spectra_row(device, (6, 8, 16) if args.dry_run else (210, 32, 256)))
    rows.append(train_step_row(device, args.dry_run))
    with open(os.path.join(args.results_dir, "measurements.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    for row in rows:
        print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None))


if __name__ == "__main__":
    main()
