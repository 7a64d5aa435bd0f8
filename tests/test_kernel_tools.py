"""The CI kernel check's variant set and verdicts, and the GPU roofline's arithmetic (no GPU, no compile)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import check_kernels  # noqa: E402
from benchmarks.gpu import roofline  # noqa: E402

triton_impl = pytest.importorskip("gard_kernels.sketch.triton_impl")


@pytest.fixture(scope="module")
def ti():
    if not triton_impl.is_available():
        pytest.skip("triton is not importable")
    return triton_impl


def _axes(variant):
    consts = dict(variant.constexprs)
    types = dict(variant.types)
    return {
        "arch": variant.arch,
        "dtype": types["x"],
        "block_ki": consts["BLOCK_KI"],
        "block_ko": consts["BLOCK_KO"],
        "block_n": consts["BLOCK_N"],
        "block_d": consts["BLOCK_D"],
        "flags": (consts["ATOMIC"], consts["ACCUMULATE"]),
        "warps": variant.num_warps,
    }


def test_default_set_covers_every_value_the_launcher_can_choose(ti):
    full = [_axes(v) for v in check_kernels.sketch_variants(ti, exhaustive=True)]
    default = [_axes(v) for v in check_kernels.sketch_variants(ti, exhaustive=False)]
    assert len(default) < len(full)
    for axis in full[0]:
        missing = {row[axis] for row in full} - {row[axis] for row in default}
        assert not missing, f"the default check never compiles {axis} = {missing}"
    # Every (dtype, token block, feature chunk, warps) launch shape appears, at every target.
    shape = lambda r: (r["arch"], r["dtype"], r["block_n"], r["block_d"], r["warps"])  # noqa: E731
    assert {shape(r) for r in full} == {shape(r) for r in default}


def test_launcher_widest_tile_is_the_checked_one(ti):
    # k up to 128 is what the heuristic is checked for; wider tiles than MAX_BLOCK_K never launch.
    assert max(ti.sign_tile_width(k) for k in range(1, 129)) == ti.MAX_BLOCK_K == max(ti.SIGN_TILE_WIDTHS)
    widths = {_axes(v)["block_ki"] for v in check_kernels.sketch_variants(ti, exhaustive=False)}
    assert widths == {16, 32, 64}


@pytest.mark.parametrize(
    "row, verdict",
    [
        (dict(arch=90, regs=200, spill=0, smem=1000, warps=8), "ok"),
        (dict(arch=90, regs=255, spill=8, smem=1000, warps=8), "SPILLS 8 B"),
        (dict(arch=89, regs=100, spill=0, smem=101377, warps=4), "SHARED 101377 B > 101376 B"),
        (dict(arch=80, regs=255, spill=0, smem=0, warps=16), "REGISTERS 255 x 512 threads > 65536"),
        (dict(arch=80, error="PTXASError: boom"), "COMPILE ERROR: PTXASError: boom"),
    ],
)
def test_verdicts(row, verdict):
    assert check_kernels.verdict(row) == verdict


def test_cuda_plan_mirrors_the_launcher():
    # bt = 128 at k = 16: 4 * (128 * (33 + 16 + 16) + 32 * 16) bytes.
    assert check_kernels.cuda_dynamic_smem(16, 16, 232448) == 4 * (128 * 65 + 32 * 16)
    # A limit below every tile: the launcher refuses, the check reports None.
    assert check_kernels.cuda_dynamic_smem(128, 128, 1024) is None


def test_roofline_counts_and_bounds():
    cost = roofline.sketch_cost(8192, 4096, 4096, 16, 16, "bf16")
    assert cost.bytes_read == 8192 * 8192 * 2
    assert cost.flops == 2 * 8192 * (4096 * 16 * 2 + 16 * 16)
    for gpu in roofline.GPUS.values():
        bound = roofline.bound_seconds(cost, gpu, "bf16")
        assert bound["bound"] == max(bound["memory"], bound["compute"]) == bound["memory"]
    h200 = roofline.bound_seconds(cost, roofline.GPUS["H200"], "bf16")
    assert h200["memory"] == pytest.approx((cost.bytes_read + 16 * 16 * 4) / 4.8e12)
    assert roofline.match_gpu("NVIDIA RTX 6000 Ada Generation") is roofline.GPUS["RTX 6000 Ada"]
    assert roofline.match_gpu("NVIDIA H200") is roofline.GPUS["H200"]
    assert roofline.match_gpu("NVIDIA A100-SXM4-80GB") is None


def test_launch_plan_is_the_launchers_public_heuristic(ti):
    import torch

    # H200 (132 SMs), bf16, 16-column tiles: 128-feature chunks, 4 warps, one 64-token block per program.
    assert ti.launch_plan("sketch", 8192, torch.bfloat16, 16, sms=132) == ti.LaunchPlan(64, 128, 128, 4)
    # Few tokens: the token block halves (once) so more SMs get work.
    assert ti.launch_plan("sketch", 2048, torch.bfloat16, 16, sms=132).block_n == 32
    # The interpreter (no GPU): at most 4 programs.
    assert ti.launch_plan("sketch", 8192, torch.float32, 64).programs == 4
    assert ti.launch_plan("split_outer", 4096, torch.float32, 64, 64) == ti.LaunchPlan(32, None, 4, 16)
    with pytest.raises(ValueError, match="needs the side's feature count d"):
        ti.launch_plan("split_project", 4096, torch.float32, 16)
    with pytest.raises(ValueError, match="kernel must be"):
        ti.launch_plan("fused", 4096, torch.float32, 16)
