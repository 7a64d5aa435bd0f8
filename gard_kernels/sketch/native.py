"""Loads the csrc extension (C++ CPU kernel, CUDA kernel when CUDA is present), JIT and cached.

Nothing is built at import: the first `is_available()` builds the extension with
`torch.utils.cpp_extension.load` (ninja) into torch's extension directory
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions). The build name carries a hash of the
sources, the flags, the torch version and, for `-march=native` builds, the CPU, so a source change
builds anew, other processes reuse a finished build, and a home directory shared between machines
never runs code compiled for another CPU. The CUDA kernel is added only when torch sees a GPU and a
CUDA toolchain exists; if that build fails, a CPU-only build is tried. Any failure warns once (with
the reason and a fix) and makes `is_available` return False: the torch backend takes over. The
reason names the real cause, checked in this order: the sources are not in the installation, no
C++ compiler, no ninja, or the build itself failed (with the compiler's message). The toolchain
is checked only after a failed attempt, so a finished build in the cache loads without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

_OP_NAMESPACE = "gard_kernels"
_SOURCES = ("bindings.cpp", "cpu/sketch_cpu.cpp")
_CUDA_SOURCES = ("cuda/sketch_cuda.cu",)
_HEADERS = ("hash.h", "cuda/sketch_cuda.h")
# What a CPU-only build reads: without any of these the sources count as missing.
_CPU_FILES = _SOURCES + ("hash.h",)
_BUILD_LOCK = threading.Lock()


class _State:
    """What the one build attempt of this process found (None: not attempted yet)."""

    loaded: bool | None = None
    with_cuda = False
    # device type -> why the native backend is unusable for it, and what to do about it
    reasons: dict[str, str] = {}
    fixes: dict[str, str] = {}
    warned: set[str] = set()


def _csrc_candidates() -> tuple[Path, Path]:
    """gard_kernels/_csrc (installed wheel) and csrc/ of a source checkout, in search order."""
    package = Path(__file__).resolve().parents[1]
    return package / "_csrc", package.parent / "csrc"


def _csrc_dir() -> Path | None:
    """The first candidate directory that holds every source and header of the CPU build."""
    for candidate in _csrc_candidates():
        if all((candidate / rel).is_file() for rel in _CPU_FILES):
            return candidate
    return None


def _missing_sources_reason() -> str:
    """Which candidate directories were searched and what each lacks."""
    found = []
    for candidate in _csrc_candidates():
        missing = [rel for rel in _CPU_FILES if not (candidate / rel).is_file()]
        found.append(f"{candidate}: " + ("missing" if not candidate.is_dir() else "lacks " + ", ".join(missing)))
    return "the C++ sources are not in this installation (" + "; ".join(found) + ")"


def _toolchain_problem() -> tuple[str, str] | None:
    """(reason, fix) when the C++ compiler or ninja that torch's JIT build runs is missing."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (
            f"no C++ compiler: {compiler!r} (torch builds with $CXX, default c++) is not on PATH",
            "install g++ or clang++ (e.g. `apt-get install g++`), or point CXX at one",
        )
    if not cpp_extension.is_ninja_available():
        return ("ninja is not on PATH (torch's JIT build runs it)", "`pip install ninja`, in the environment you run in")
    return None


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler torch will use accepts `flag` (a tiny probe compile)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run(
            [compiler, flag, "-x", "c++", "-c", "-", "-o", os.devnull],
            input=b"int gard_probe() { return 0; }\n",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _host_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for the C++ sources, dropping what the compiler rejects."""
    if os.name == "nt":
        return ["/O2", "/openmp"], []
    cflags = ["-O3"]
    # -march=native: the build runs on the user's machine (JIT), so use its full vector ISA.
    # -ffp-contract=fast: let a*b+c become one FMA in the micro-kernel.
    for flag in ("-march=native", "-ffp-contract=fast"):
        if _compiler_accepts(flag):
            cflags.append(flag)
    ldflags = []
    if _compiler_accepts("-fopenmp"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _cpu_fingerprint() -> str:
    """Identifies the instruction sets of this CPU (a -march=native build is only valid on it)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if len(parts) >= 4:
                    break
    except OSError:
        pass
    return "|".join(parts)


def _build_name(csrc: Path, sources: list[str], flags: list[str]) -> str:
    digest = hashlib.sha256()
    # The CUDA header is read only by a CUDA build; hashing it always would bind CPU builds to it.
    headers = _HEADERS if any(rel.endswith(".cu") for rel in sources) else _CPU_FILES
    for rel in sorted(set(sources) | set(headers)):
        digest.update(rel.encode())
        digest.update((csrc / rel).read_bytes())
    digest.update(repr(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(str(torch.version.cuda).encode())
    if "-march=native" in flags:
        digest.update(_cpu_fingerprint().encode())
    return f"gard_kernels_native_{digest.hexdigest()[:16]}"


def _cuda_toolchain_missing() -> str | None:
    """Why the CUDA kernel cannot be built here, or None when it can."""
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to a toolkit with nvcc)"
    return None


def _build(csrc: Path, with_cuda: bool) -> None:
    """Compile (or reuse) and load the extension; raises on failure."""
    from torch.utils import cpp_extension

    cflags, ldflags = _host_flags()
    sources = list(_SOURCES)
    cuda_flags: list[str] = []
    if with_cuda:
        sources += _CUDA_SOURCES
        cflags = cflags + ["-DWITH_CUDA"]
        cuda_flags = ["-O3"]
    name = _build_name(csrc, sources, cflags + ldflags + cuda_flags)
    with warnings.catch_warnings():
        # torch's own build chatter (arch lists, compiler versions) is noise here; failures raise.
        warnings.simplefilter("ignore")
        cpp_extension.load(
            name=name,
            sources=[str(csrc / rel) for rel in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(csrc)],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )


def _register_fake() -> None:
    """Fake (meta) kernel of the sketch op: it returns nothing, so only the checks torch needs."""
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{_OP_NAMESPACE}::sketch", "Meta"):
        return  # this module was reloaded into a process that already holds the library
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register(f"{_OP_NAMESPACE}::sketch")
    def _sketch_fake(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate):
        torch._check(x.dim() == 2 and dy.dim() == 2, lambda: "gard_kernels::sketch: x and dy must be 2-D")
        torch._check(x.shape[0] == dy.shape[0], lambda: "gard_kernels::sketch: token counts differ")
        return None


def _short(error: BaseException) -> str:
    """A (possibly long compiler) error message cut to its first line, its `error:` lines and its end."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) <= 12:
        return "\n".join(lines)
    # The compiler's diagnostics sit in the middle, between long command lines.
    diagnostics = [line for line in lines[1:-3] if "error" in line.lower() and len(line) < 400][:6]
    return "\n".join([lines[0], "...", *diagnostics, "...", *lines[-3:]])


def _load() -> None:
    """Build and load once per process; records why a device type is unusable."""
    with _BUILD_LOCK:
        if _State.loaded is None:
            _load_locked()


def _fail(device_types: tuple[str, ...], reason: str, fix: str) -> None:
    for device_type in device_types:
        _State.reasons.setdefault(device_type, reason)
        _State.fixes.setdefault(device_type, fix)


def _load_locked() -> None:
    _State.loaded = False
    try:
        csrc = _csrc_dir()
        if csrc is None:
            _fail(
                ("cpu", "cuda"),
                _missing_sources_reason(),
                "reinstall gard_kernels from its wheel or source tree (`pip install .`): the wheel ships "
                "the sources as gard_kernels/_csrc",
            )
            return
        cuda_missing = _cuda_toolchain_missing()
        attempts = [True, False] if cuda_missing is None else [False]
        errors = []
        for with_cuda in attempts:
            try:
                _build(csrc, with_cuda)
            except Exception as error:  # compiler missing, compile error, load error: all fall back
                errors.append(("CUDA build: " if with_cuda else "C++ build: ") + _short(error))
                continue
            _register_fake()
            _State.loaded = True
            _State.with_cuda = with_cuda
            break
        build_fix = (
            "the compiler output above says what failed; the build needs a C++17 compiler that accepts "
            "torch's headers (TORCH_EXTENSIONS_DIR holds the build directory)"
        )
        # Diagnosed after the attempt, not before: a finished build in the cache loads without
        # a compiler or ninja.
        problem = None if _State.loaded else _toolchain_problem()
        if problem is not None:
            _fail(("cpu", "cuda"), *problem)
        if not _State.loaded:
            _fail(("cpu",), "the build failed: " + "\n".join(errors), build_fix)
        if not _State.with_cuda:
            if errors:
                _fail(("cuda",), "the build failed: " + "\n".join(errors), build_fix)
            else:
                _fail(
                    ("cuda",),
                    cuda_missing or "CUDA kernel not built",
                    "install a CUDA toolkit matching torch.version.cuda and set CUDA_HOME",
                )
    except Exception as error:
        _State.loaded = False
        _fail(("cpu", "cuda"), _short(error), "report this error to the gard_kernels maintainers")


def _warn_once(device_type: str) -> None:
    if device_type in _State.warned:
        return
    _State.warned.add(device_type)
    fix = _State.fixes.get(device_type, "unknown")
    warnings.warn(
        f"gard_kernels: the native {device_type} sketch kernel is unavailable, falling back to the torch "
        f"backend. Reason: {_State.reasons.get(device_type, 'unknown')}\nTo fix: {fix}.",
        RuntimeWarning,
        stacklevel=3,
    )


def unavailable_reason(device_type: str) -> str | None:
    """Why the native backend cannot run on `device_type` (None when it can). Builds if needed."""
    return None if is_available(device_type) else _State.reasons.get(device_type, f"no native kernel for {device_type}")


def is_available(device_type: str) -> bool:
    """Whether the native sketch runs on `device_type` ("cpu" or "cuda"); never raises.

    The first call builds (or loads the cached build of) the extension; a failure warns once.
    """
    try:
        if device_type not in ("cpu", "cuda"):
            _State.reasons.setdefault(device_type, f"no native kernel for device type {device_type!r}")
            return False
        if device_type == "cuda" and not torch.cuda.is_available():
            # No GPU is not a failure worth a warning.
            _State.reasons["cuda"] = "torch sees no CUDA device"
            return False
        _load()
        usable = bool(_State.loaded) and (device_type == "cpu" or _State.with_cuda)
        if not usable:
            _warn_once(device_type)
        return usable
    except Exception as error:
        _State.reasons.setdefault(device_type, _short(error))
        return False


def sketch_native(x, dy, key_in, key_out, k_in, k_out, scale, out, accumulate):
    """out (+)= scale * (dy @ Sgn_out)^T (x @ Sgn_in) with the fused C++/CUDA kernel.

    Args:
        x: [N, d_in] float32 / float16 / bfloat16, any strides.
        dy: [N, d_out], same dtype and device as x.
        key_in, key_out: 32-bit stream keys of Sgn_in [d_in, k_in] and Sgn_out [d_out, k_out].
        k_in, k_out: sketch widths.
        scale: multiplies the +-1 sums (1/sqrt(k_in k_out) for GradientSketch).
        out: [k_out, k_in] float32 contiguous on x's device, updated in place.
        accumulate: add into out (True) or overwrite it without reading it (False).
    Returns:
        out.
    """
    device_type = x.device.type
    if not is_available(device_type):
        raise RuntimeError(
            f"the native sketch backend is unavailable for {device_type} tensors: "
            f"{_State.reasons.get(device_type, 'unknown reason')}"
        )
    torch.ops.gard_kernels.sketch(
        x, dy, int(key_in), int(key_out), int(k_in), int(k_out), float(scale), out, bool(accumulate)
    )
    return out


def projection_native(key: int, d: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """P [d, k] float32 = +-1/sqrt(k) computed by csrc/hash.h (for hash-equality tests)."""
    if not is_available("cpu"):
        raise RuntimeError(f"the native extension is unavailable: {_State.reasons.get('cpu', 'unknown reason')}")
    return torch.ops.gard_kernels.projection(int(key), int(d), int(k)).to(device)


def cpu_bf16_dot_supported() -> bool:
    """Whether bfloat16 inputs on this CPU take the AVX-512 BF16 (vdpbf16ps) path of the C++ kernel."""
    return is_available("cpu") and bool(torch.ops.gard_kernels.cpu_bf16_dot_supported())


@contextlib.contextmanager
def cpu_bf16_dot(enabled: bool):
    """Allow (True) or forbid (False) the AVX-512 BF16 path inside the block, process-wide.

    Forbidding it runs bfloat16 inputs through the float32 fallback, so tests and benchmarks cover
    both paths on a CPU that has the instructions. Allowing it on a CPU without them changes nothing.
    """
    if not is_available("cpu"):
        raise RuntimeError(f"the native extension is unavailable: {_State.reasons.get('cpu', 'unknown reason')}")
    previous = bool(torch.ops.gard_kernels.set_cpu_bf16_dot(bool(enabled)))
    try:
        yield
    finally:
        torch.ops.gard_kernels.set_cpu_bf16_dot(previous)
