"""Compile every GPU kernel of the package ahead of time for sm_80 / sm_89 / sm_90, without a GPU.

Triton kernels go through `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`,
whose ptxas ships inside the triton wheel; the CUDA kernel goes through `nvcc -Xptxas -v`. For
each compiled variant the script reads registers per thread, spilled bytes and shared memory per
block, prints one table, and exits non-zero on any compile error, any spill, shared memory above
the target's per-block limit, or more registers per block than an SM holds.

Usage:
    python benchmarks/check_kernels.py [--all] [--jobs N] [--markdown docs/benchmarks.md]

Variants come from the launchers' own heuristics (triton_impl.launch_plan and SIGN_TILE_WIDTHS), so a
heuristic change changes what is compiled. The default set covers every value each launcher can
choose on every axis: every dtype with every square sketch tile (BLOCK_KI = BLOCK_KO in 16..64)
and the two most lopsided ones (16 x 64, 64 x 16), num_warps and PRECISION following from them
as in the launcher; the epilogue flags (ATOMIC / ACCUMULATE) and the smaller token blocks at the
smallest and largest tiles. That is 144 compiles, 54 s on this project's 2 shared cores with an
empty Triton cache. `--all` compiles the full cross-product the launchers can produce (714
compiles, about 5 minutes). Compiled kernels land in Triton's cache (~/.triton/cache), so a
rerun takes seconds.

Variants are compiled for the specialisation the training path launches: 16-byte-aligned
pointers and unit feature strides (Triton turns an int argument equal to 1 into a constant).
When nvcc is missing the CUDA rows are skipped with a message, as csrc/check_cuda_compiles.sh does.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 89, 90)
CUDA_ARCHS = (89, 90)
# Largest dynamic shared memory one block may opt into, bytes (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability": 163 KB on 8.0, 99 KB on 8.6/8.9, 227 KB on 9.0).
SMEM_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# 64 K 32-bit registers per SM (and per block) on every one of these targets.
REGS_PER_BLOCK = 64 * 1024
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# SM counts the launch heuristic is evaluated at: A100, H100/H200 SXM, RTX 6000 Ada.
SM_COUNTS = (108, 132, 142)


@dataclass(frozen=True)
class Variant:
    """One Triton compile: kernel name in triton_impl, target, argument types and constants."""

    kernel: str
    arch: int
    label: str
    types: tuple  # ((arg, triton type), ...) for the non-constant arguments
    constexprs: tuple  # ((arg, value), ...)
    aligned: tuple  # pointer / int arguments known divisible by 16
    num_warps: int


def _triton_impl():
    from gard_kernels.sketch import triton_impl

    if not triton_impl.is_available():
        sys.exit("check_kernels: triton is not importable; install the triton extra (pip install -e '.[triton]')")
    return triton_impl


def _launcher_configs(ti, dtype, block_k: int) -> set[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_D, num_warps) that sketch_triton's heuristic picks for some N on some GPU."""
    configs = set()
    for sms in SM_COUNTS:
        for n in (2**e for e in range(0, 25)):
            plan = ti.launch_plan("sketch", n, dtype, block_k, sms=sms)
            configs.add((plan.block_n, plan.block_d, plan.num_warps))
    return configs


def _covering_tile(bki: int, bko: int, block_ks: list[int]) -> bool:
    """The default set's sign tiles: square ones of every width and the two most lopsided ones
    (each side's width is then one of the square cases')."""
    return bki == bko or {bki, bko} == {block_ks[0], block_ks[-1]}


def sketch_variants(ti, exhaustive: bool) -> list[Variant]:
    """Every _sketch_kernel variant sketch_triton can launch (default: the covering subset)."""
    block_ks = list(ti.SIGN_TILE_WIDTHS)
    # sketch_triton: one program per tile stores or adds directly (ATOMIC off, ACCUMULATE as asked);
    # several programs either write partials (both off) or add with atomics (ATOMIC on).
    flag_sets = [(False, False), (False, True), (True, False)]
    corner_ks = {block_ks[0], block_ks[-1]}
    variants = []
    for dtype, (bki, bko), arch in itertools.product(ti.ACCEPTED_DTYPES, itertools.product(block_ks, repeat=2), ARCHS):
        # --all adds the mixed pairs the default set leaves out.
        if not (exhaustive or _covering_tile(bki, bko, block_ks)):
            continue
        configs = _launcher_configs(ti, dtype, max(bki, bko))
        largest_bn = max(bn for bn, _, _ in configs)
        for (bn, bd, warps), (atomic, accumulate) in itertools.product(sorted(configs), flag_sets):
            main_loop = bn == largest_bn and not atomic and not accumulate
            corner = bki == bko and bki in corner_ks
            if not (exhaustive or main_loop or (corner and (bn == largest_bn or not (atomic or accumulate)))):
                continue
            t = "*" + TRITON_DTYPE[dtype]
            types = dict(x=t, dy=t, o="*fp32", key_in="i32", key_out="i32", scale="fp32")
            for name in ("N", "D_IN", "D_OUT", "K_IN", "K_OUT", "stride_xn", "stride_yn", "stride_op", "stride_om"):
                types[name] = "i32"
            consts = dict(
                stride_xd=1, stride_yd=1, stride_ok=1, BLOCK_N=bn, BLOCK_D=bd, BLOCK_KI=bki, BLOCK_KO=bko,
                # as sketch_triton: full-precision products for fp32, the default path for 16-bit
                PRECISION="ieee" if dtype == torch.float32 else None, ATOMIC=atomic, ACCUMULATE=accumulate,
            )
            flags = "atomic" if atomic else ("accumulate" if accumulate else "store")
            label = f"{TRITON_DTYPE[dtype]} BN={bn} BD={bd} KI={bki} KO={bko} {flags}"
            variants.append(Variant("_sketch_kernel", arch, label, tuple(types.items()), tuple(consts.items()),
                                    ("x", "dy", "o"), warps))
    return variants


def small_kernel_variants(ti) -> list[Variant]:
    """_sketch_reduce_kernel and _projection_kernel as sketch_triton / projection_triton launch them."""
    block_ks = list(ti.SIGN_TILE_WIDTHS)
    variants = []
    reduce_blocks = sorted({min(b, 32) for b in block_ks})
    for arch, bm, bk, accumulate in itertools.product(ARCHS, reduce_blocks, reduce_blocks, (False, True)):
        types = dict(part="*fp32", o="*fp32", P="i32", K_OUT="i32", K_IN="i32", stride_pp="i32", stride_pm="i32",
                     stride_om="i32")
        consts = dict(stride_pk=1, stride_ok=1, BLOCK_M=bm, BLOCK_K=bk, ACCUMULATE=accumulate)
        variants.append(Variant("_sketch_reduce_kernel", arch, f"BM={bm} BK={bk} accumulate={accumulate}",
                                tuple(types.items()), tuple(consts.items()), ("part", "o"), 4))
    # projection_triton: 64-row tiles, at most 32 columns.
    for arch, bk in itertools.product(ARCHS, sorted({min(b, 32) for b in block_ks})):
        types = dict(p="*fp32", key="i32", scale="fp32", D="i32", K="i32", stride_d="i32")
        consts = dict(stride_k=1, BLOCK_D=64, BLOCK_K=bk)
        variants.append(Variant("_projection_kernel", arch, f"BD=64 BK={bk}", tuple(types.items()),
                                tuple(consts.items()), ("p",), 4))
    return variants


def split_variants(ti) -> list[Variant]:
    """_split_project_kernel and _split_outer_kernel (sketch_triton's algorithm="split") at every
    shape its heuristic picks: each dtype with each sign-tile width."""
    block_ks = list(ti.SIGN_TILE_WIDTHS)
    variants = []
    for dtype, bk, arch in itertools.product(ti.ACCEPTED_DTYPES, block_ks, ARCHS):
        plan = ti.launch_plan("split_project", 4096, dtype, bk, d=4096)
        bn, bd, warps = plan.block_n, plan.block_d, plan.num_warps
        t = "*" + TRITON_DTYPE[dtype]
        types = dict(a=t, part="*fp32", key="i32", N="i32", D="i32", K="i32", stride_n="i32", stride_ps="i32",
                     stride_pn="i32", d_per_split="i32")
        consts = dict(stride_d=1, BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk, PRECISION="ieee" if dtype == torch.float32 else None)
        variants.append(Variant("_split_project_kernel", arch, f"{TRITON_DTYPE[dtype]} BN={bn} BD={bd} K={bk}",
                                tuple(types.items()), tuple(consts.items()), ("a", "part"), warps))
    for arch, bki, bko in itertools.product(ARCHS, block_ks, block_ks):
        if not _covering_tile(bki, bko, block_ks):
            continue
        types = dict(part_x="*fp32", part_y="*fp32", o="*fp32", scale="fp32", N="i32", S_IN="i32", S_OUT="i32",
                     K_IN="i32", K_OUT="i32", stride_xs="i32", stride_xn="i32", stride_ys="i32", stride_yn="i32",
                     stride_op="i32", stride_om="i32")
        outer = ti.launch_plan("split_outer", 4096, torch.float32, bki, bko)
        bn, warps = outer.block_n, outer.num_warps
        consts = dict(BLOCK_N=bn, BLOCK_KI=bki, BLOCK_KO=bko)
        variants.append(Variant("_split_outer_kernel", arch, f"BN={bn} KI={bki} KO={bko}", tuple(types.items()),
                                tuple(consts.items()), ("part_x", "part_y", "o"), warps))
    return variants


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else (shutil.which("cuobjdump") or "")


def compile_triton(variant: Variant) -> dict:
    """Compile one variant; registers and local memory from the cubin, shared memory from Triton."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ti = _triton_impl()
    fn = getattr(ti, variant.kernel)
    constexprs = dict(variant.constexprs)
    signature = {name: dict(variant.types).get(name, "constexpr") for name in fn.arg_names}
    missing = [name for name, kind in signature.items() if kind == "constexpr" and name not in constexprs]
    assert not missing, f"{variant.kernel}: no type or value for {missing}; update check_kernels.py"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in variant.aligned}
    row = dict(kernel=variant.kernel, arch=variant.arch, variant=variant.label, warps=variant.num_warps)
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", variant.arch, 32),
            options={"num_warps": variant.num_warps},
        )
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as error:  # compile errors are what this check exists to report
        return dict(row, error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
    (regs, stack, local, static_smem), = usage.values()
    return dict(row, regs=regs, spill=stack + local, smem=compiled.metadata.shared + static_smem,
                seconds=time.perf_counter() - start)


def _resource_usage(cubin: bytes) -> dict[str, tuple[int, int, int, int]]:
    """function -> (registers, stack bytes, local bytes, static shared bytes) via cuobjdump.

    ptxas puts spilled registers in the stack frame, so a Triton kernel (no local arrays, no
    calls) spills exactly when STACK or LOCAL is non-zero.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields))
        usage[name] = tuple(int(values.get(key, 0)) for key in ("REG", "STACK", "LOCAL", "SHARED"))
    if not usage:
        raise RuntimeError(f"cuobjdump reported no function:\n{text}")
    return usage


def find_nvcc() -> str | None:
    """nvcc as csrc/check_cuda_compiles.sh finds it: $NVCC, PATH, /usr/local/cuda/bin."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def compile_cuda(job: tuple[str, int]) -> list[dict]:
    """nvcc -Xptxas -v on csrc/cuda/sketch_cuda.cu for one arch; one row per kernel function."""
    nvcc, arch = job
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c",
             str(ROOT / "csrc" / "cuda" / "sketch_cuda.cu"), "-o", os.path.join(tmp, "sketch_cuda.o")],
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        return [dict(kernel="sketch_cuda.cu", arch=arch, variant="nvcc", warps=8,
                     error="nvcc failed: " + (result.stderr.strip().splitlines() or ["?"])[-1][:300])]
    rows = []
    log = result.stderr + result.stdout
    # ptxas -v: "Compiling entry function 'F' for 'sm_90'", then "S bytes stack frame, A bytes spill
    # stores, B bytes spill loads" and "Used R registers, ... N bytes smem".
    for block in re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]:
        name = re.match(r"'(\S+)'", block).group(1)
        spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        smem = re.search(r"(\d+) bytes smem", block)
        rows.append(dict(kernel=_demangle(name), arch=arch, variant="nvcc -O3 (static smem)", warps=8,
                         regs=regs, spill=spill, smem=int(smem.group(1)) if smem else 0))
    if not rows:
        rows.append(dict(kernel="sketch_cuda.cu", arch=arch, variant="nvcc", warps=8,
                         error="no 'Compiling entry function' line in the ptxas -v output"))
    return rows


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    text = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    # "void gard_kernels::(anonymous namespace)::f<float>(args)" -> "f<float>"
    text = re.sub(r"\(anonymous namespace\)::|gard_kernels::|^void ", "", text)
    return text.split("(")[0]


def cuda_dynamic_smem(k_in: int, k_out: int, limit: int) -> int | None:
    """Dynamic shared memory of the CUDA sketch at (k_in, k_out): make_plan in sketch_cuda.cu.

    Mirrors its constants (256 threads, 32-feature chunks padded to 33, 8 columns per thread,
    96 KiB target); None when no token tile fits `limit` (the launcher then refuses with an error).
    """
    threads, chunk, cols_per_thread, target = 256, 32, 8, 96 * 1024
    for bt in (128, 64, 32):
        step = (threads // bt) * cols_per_thread
        kp_in, kp_out = -(-k_in // step) * step, -(-k_out // step) * step
        smem = 4 * (bt * (chunk + 1 + kp_in + kp_out) + chunk * max(kp_in, kp_out))
        if smem <= limit and (smem <= target or bt == 32):
            return smem
    return None


def verdict(row: dict) -> str:
    if "error" in row:
        return "COMPILE ERROR: " + row["error"]
    problems = []
    if row["spill"]:
        problems.append(f"SPILLS {row['spill']} B")
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        problems.append(f"SHARED {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["regs"] * row["warps"] * 32 > REGS_PER_BLOCK:
        problems.append(f"REGISTERS {row['regs']} x {row['warps'] * 32} threads > {REGS_PER_BLOCK}")
    return "; ".join(problems) or "ok"


def render(rows: list[dict]) -> str:
    lines = ["| kernel | sm | variant | warps | regs | spill (B) | smem (B) | smem limit (B) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        regs = row.get("regs", "-")
        lines.append(f"| {row['kernel']} | {row['arch']} | {row['variant']} | {row['warps']} | {regs} | "
                     f"{row.get('spill', '-')} | {row.get('smem', '-')} | {SMEM_LIMIT[row['arch']]} | {verdict(row)} |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    """Per kernel and arch: variant count, register / spill / shared-memory maxima, failures."""
    lines = ["| kernel | sm | variants | max regs | max spill (B) | max smem (B) | smem limit (B) | failures |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["arch"]), []).append(row)
    for (kernel, arch), group in groups.items():
        ok = [r for r in group if "error" not in r]
        failures = sum(verdict(r) != "ok" for r in group)
        top = lambda key: max((r[key] for r in ok), default="-")  # noqa: E731
        lines.append(f"| {kernel} | {arch} | {len(group)} | {top('regs')} | {top('spill')} | {top('smem')} | "
                     f"{SMEM_LIMIT[arch]} | {failures} |")
    return "\n".join(lines)


def write_markdown(path: Path, summary: str, table: str, header: str) -> None:
    start, end = "<!-- kernels:begin -->", "<!-- kernels:end -->"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in doc:
        doc += f"\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    body = f"{header}\n\n{summary}\n\n<details><summary>every variant</summary>\n\n{table}\n\n</details>\n"
    path.write_text(f"{head}{start}\n{body}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="the full cross-product of launcher variants")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    parser.add_argument("--markdown", type=Path, help="write the tables between the kernels markers of this file")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("check_kernels: triton was imported under TRITON_INTERPRET=1; run this script in a fresh process")
    # Compiling needs the real backend: under the interpreter triton.jit functions do not compile.
    os.environ.pop("TRITON_INTERPRET", None)
    # Fusion on is what launches use today; setting it silences Triton 3.9's default-change warning.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    start = time.perf_counter()
    ti = _triton_impl()
    import triton

    variants = sketch_variants(ti, args.all) + small_kernel_variants(ti) + split_variants(ti)
    nvcc = find_nvcc()
    print(f"check_kernels: {len(variants)} Triton variants for sm_{'/'.join(map(str, ARCHS))}"
          f" (triton {triton.__version__}), {args.jobs} jobs", flush=True)
    with get_context("fork").Pool(args.jobs) as pool:
        cuda_jobs = pool.map_async(compile_cuda, [(nvcc, arch) for arch in CUDA_ARCHS]) if nvcc else None
        rows = pool.map(compile_triton, variants, chunksize=1)
        cuda_rows = [row for group in cuda_jobs.get() for row in group] if cuda_jobs else []
    if nvcc is None:
        print("check_kernels: nvcc not found, skipping the CUDA kernel (as csrc/check_cuda_compiles.sh does)")
    else:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(f"check_kernels: CUDA kernel with {version}")
        for arch in CUDA_ARCHS:
            for k in (16, 128):
                smem = cuda_dynamic_smem(k, k, SMEM_LIMIT[arch])
                cuda_rows.append(dict(kernel="sketch_partials_kernel", arch=arch, variant=f"dynamic smem at k={k}",
                                      warps=8, regs=0, spill=0, smem=smem if smem is not None else 1 << 30))
    rows = rows + cuda_rows
    table, summary = render(rows), summarise(rows)
    print(table)
    print()
    print(summary)
    failures = [r for r in rows if verdict(r) != "ok"]
    elapsed = time.perf_counter() - start
    print(f"\ncheck_kernels: {len(rows)} rows, {len(failures)} failing, {elapsed:.0f} s")
    if args.markdown:
        header = (f"`python benchmarks/check_kernels.py{' --all' if args.all else ''}`: triton {triton.__version__}"
                  f"{', ' + version if nvcc else ', no nvcc'}; {len(rows)} rows, {len(failures)} failing.")
        write_markdown(args.markdown, summary, table, header)
    for row in failures:
        print(f"FAILED: {row['kernel']} sm_{row['arch']} {row['variant']}: {verdict(row)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
