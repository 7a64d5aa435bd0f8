"""Interleaved CPU rates: torch matmul against the fused C++ sketch, fp32 and bf16, in GFLOP/s.

Usage: python benchmarks/cpu_rate.py [--threads T] [--rounds R]

The rows of benchmarks/test_bench_cpu_rate.py, timed round-robin (one call of each per round,
medians over rounds) so that load from other processes on a shared machine falls on every row
alike; pytest-benchmark times each row in a block of its own. Shapes: 2048^3 matmul, sketch
N4096-d2048 with k_in = k_out = 16 (FLOPs as in benchmarks/gpu/roofline.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gard_kernels as gk  # noqa: E402
from benchmarks.shapes import SKETCH_SHAPES  # noqa: E402
from gard_kernels.sketch import native  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not native.is_available("cpu"):
        sys.exit(f"the C++ backend is unavailable: {native.unavailable_reason('cpu')}")

    s = SKETCH_SHAPES["N4096-d2048"]
    sk = gk.GradientSketch(s["d_in"], s["d_out"], s["k_in"], s["k_out"], seed=1)
    sketch_flops = 2 * s["n"] * (s["d_in"] * s["k_in"] + s["d_out"] * s["k_out"] + s["k_in"] * s["k_out"])
    size = 2048
    inputs = {dt: (torch.randn(s["n"], s["d_in"]).to(dt), torch.randn(s["n"], s["d_out"]).to(dt))
              for dt in (torch.float32, torch.bfloat16)}
    mats = {dt: (torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    out = torch.empty(s["k_out"], s["k_in"])

    def sketch(dtype, bf16_dot):
        x, dy = inputs[dtype]

        def run():
            with native.cpu_bf16_dot(bf16_dot):
                native.sketch_native(x, dy, sk.key_in, sk.key_out, sk.k_in, sk.k_out, sk.scale, out, False)

        return run

    rows = {
        "matmul fp32": (lambda: mats[torch.float32][0] @ mats[torch.float32][1], 2 * size**3, 1),
        "matmul bf16": (lambda: mats[torch.bfloat16][0] @ mats[torch.bfloat16][1], 2 * size**3, 1),
        "sketch fp32": (sketch(torch.float32, True), sketch_flops, 10),
        "sketch bf16 (vdpbf16ps)": (sketch(torch.bfloat16, True), sketch_flops, 10),
        "sketch bf16 (float fallback)": (sketch(torch.bfloat16, False), sketch_flops, 10),
    }
    if not native.cpu_bf16_dot_supported():
        del rows["sketch bf16 (vdpbf16ps)"]
    samples = {name: [] for name in rows}
    for fn, _, _ in rows.values():
        fn()
    for _ in range(args.rounds):
        for name, (fn, _, calls) in rows.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    rates = {name: rows[name][1] / statistics.median(t) for name, t in samples.items()}
    print(f"threads {args.threads}, rounds {args.rounds}, load average {os.getloadavg()[0]:.2f}")
    for name, rate in rates.items():
        base = rates["matmul bf16" if "bf16" in name else "matmul fp32"]
        print(f"{name:30s} {statistics.median(samples[name]) * 1e3:9.3f} ms {rate / 1e9:8.1f} GFLOP/s  "
              f"{rate / base:5.2f} of matmul")


if __name__ == "__main__":
    main()
