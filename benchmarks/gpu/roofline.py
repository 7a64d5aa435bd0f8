"""Roofline of the fused sketch: bytes, FLOPs and the lower-bound time on the target GPUs.

Usage: python benchmarks/gpu/roofline.py [--markdown docs/benchmarks.md]

The sketch S = scale * (dY Sgn_out)^T (X Sgn_in) reads X [N, d_in] and dY [N, d_out] once and
writes S [k_out, k_in] in float32; the signs are hashed in registers and never read. Per token it
does 2 d_in k_in + 2 d_out k_out FLOPs of projection (tensor cores for 16-bit inputs) and
2 k_in k_out of outer product (float32 CUDA cores, input_precision="ieee"). A lower bound on the
time is the larger of bytes / memory bandwidth and the FLOP time at peak throughput.
benchmarks/gpu/measure.py prints measured / bound next to each row on the GPU.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.shapes import SKETCH_SHAPES  # noqa: E402


@dataclass(frozen=True)
class GPU:
    """Datasheet peaks: bytes/s of DRAM, dense 16-bit tensor-core and float32 FLOP/s."""

    name: str
    bandwidth: float
    tensor_16bit: float
    fp32: float
    source: str


# Dense (no 2:4 sparsity) figures. The datasheets quote sparse tensor rates; dense is half.
GPUS = {
    "RTX 6000 Ada": GPU(
        "RTX 6000 Ada", 960e9, 364.2e12, 91.1e12,
        "NVIDIA RTX 6000 Ada Generation datasheet: 960 GB/s GDDR6, 91.1 TFLOPS single precision; "
        "Ada Lovelace architecture whitepaper (appendix): 364.2 TFLOPS FP16/BF16 tensor with FP32 "
        "accumulate, dense (728.5 sparse)",
    ),
    "H200": GPU(
        "H200", 4.8e12, 989.5e12, 67e12,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM): 4.8 TB/s HBM3e, 67 TFLOPS FP32, "
        "1,979 TFLOPS BF16 tensor with sparsity (989.5 dense)",
    ),
}

# The benchmark shapes plus the large training shape the GPU target is stated at.
ROOFLINE_SHAPES = {**SKETCH_SHAPES, "N8192-d4096": dict(n=8192, d_in=4096, d_out=4096, k_in=16, k_out=16)}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Cost:
    bytes_read: int
    bytes_written: int
    projection_flops: int
    outer_flops: int

    @property
    def flops(self) -> int:
        return self.projection_flops + self.outer_flops

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def sketch_cost(n: int, d_in: int, d_out: int, k_in: int, k_out: int, dtype: str = "bf16") -> Cost:
    """Compulsory traffic and FLOPs of one sketch call (partials of the reduction excluded: they
    are programs x k_out x k_in floats, under 0.1% of the input at these shapes)."""
    return Cost(
        bytes_read=n * (d_in + d_out) * ELEMENT_BYTES[dtype],
        bytes_written=k_out * k_in * 4,
        projection_flops=2 * n * (d_in * k_in + d_out * k_out),
        outer_flops=2 * n * k_in * k_out,
    )


def bound_seconds(cost: Cost, gpu: GPU, dtype: str = "bf16") -> dict[str, float]:
    """Lower-bound seconds: memory, compute, and their maximum (the roofline)."""
    # fp32 inputs take the float32 (ieee) dot, not tensor cores.
    projection_rate = gpu.tensor_16bit if dtype != "fp32" else gpu.fp32
    memory = cost.bytes / gpu.bandwidth
    compute = cost.projection_flops / projection_rate + cost.outer_flops / gpu.fp32
    return {"memory": memory, "compute": compute, "bound": max(memory, compute)}


def match_gpu(device_name: str) -> GPU | None:
    """The GPUS entry for a torch.cuda.get_device_name() string, if it is one of ours."""
    lowered = device_name.lower()
    if "6000 ada" in lowered:
        return GPUS["RTX 6000 Ada"]
    if "h200" in lowered:
        return GPUS["H200"]
    return None


def render(dtype: str = "bf16") -> str:
    lines = [
        "| shape | N | d_in | d_out | k | read (MB) | FLOPs (G) | FLOP/B | "
        + " | ".join(f"{g.name} mem / compute bound (us)" for g in GPUS.values())
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(GPUS),
    ]
    for name, s in ROOFLINE_SHAPES.items():
        cost = sketch_cost(s["n"], s["d_in"], s["d_out"], s["k_in"], s["k_out"], dtype)
        cells = []
        for gpu in GPUS.values():
            b = bound_seconds(cost, gpu, dtype)
            cells.append(f"**{b['memory'] * 1e6:.2f}** / {b['compute'] * 1e6:.2f}")
        lines.append(
            f"| {name} | {s['n']} | {s['d_in']} | {s['d_out']} | {s['k_in']} | {cost.bytes_read / 1e6:.2f} | "
            f"{cost.flops / 1e9:.3f} | {cost.flops / cost.bytes:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Roofline of the fused sketch on the target GPUs")
    parser.add_argument("--dtype", default="bf16", choices=sorted(ELEMENT_BYTES))
    args = parser.parse_args(argv)
    print(render(args.dtype))
    print()
    for gpu in GPUS.values():
        print(f"- {gpu.name}: {gpu.source}")


if __name__ == "__main__":
    main()
