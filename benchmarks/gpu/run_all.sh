#!/usr/bin/env bash
# One GPU session, one invocation (<= 8 minutes on an H100/H200 with torch and triton installed):
# build the CUDA extension, run the whole test suite with CUDA, measure the kernels against the
# copy bandwidth, time GARD vs plain LoRA, and run the paper-style experiment end to end.
#   bash benchmarks/gpu/run_all.sh [RESULTS_DIR]          # on the GPU machine
#   bash benchmarks/gpu/run_all.sh [RESULTS_DIR] --dry-run  # same code paths, tiny, on a CPU
set -uo pipefail
cd "$(dirname "$0")/../.."
results=${1:-gpu-results}
dry=${2:-}
mkdir -p "$results"
export HF_HUB_OFFLINE=1
if [ "$dry" = "--dry-run" ]; then export TRITON_INTERPRET=1; fi

status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$results/summary.txt"; }
: > "$results/summary.txt"

python - > "$results/environment.txt" 2>&1 <<'PY'
import datetime, torch
print("date", datetime.date.today())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name())
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$results/environment.txt" 2>/dev/null
cat "$results/environment.txt"

if python -c "import sys; from gard_kernels.sketch import native; sys.exit(not native.is_available('cuda' if '$dry' != '--dry-run' else 'cpu'))" > "$results/build.log" 2>&1; then
  status "native build" ok
else
  status "native build" "FAILED (see build.log)"
fi

tests=(tests)
[ "$dry" = "--dry-run" ] && tests=(tests/test_sketch.py tests/test_triton.py tests/test_native.py)
if timeout 300 python -m pytest -q -x "${tests[@]}" > "$results/tests.log" 2>&1; then
  status "test suite" "$(tail -n 1 "$results/tests.log")"
else
  status "test suite" "FAILED: $(tail -n 1 "$results/tests.log")"
fi

# Each sketch row: ms, bound_us (roofline at the datasheet peaks), x_bound = measured / bound,
# of_copy_bw (goal >= 0.70 for bf16 at N8192-d4096). roofline.md holds the bounds for both GPUs.
python benchmarks/gpu/roofline.py > "$results/roofline.md" 2>&1
timeout 240 python benchmarks/gpu/measure.py "$results" $dry > "$results/measure.log" 2>&1
status "measurements" "exit $? (measure.log, measurements.json)"

steps=200
[ "$dry" = "--dry-run" ] && steps=2
if timeout 240 python -m gard_kernels finetune --method gard-dynamic --budget 2570 --seed 0 \
    --steps "$steps" --out "$results/paper-run" > "$results/paper-run.log" 2>&1; then
  status "paper-style run" "$(python -c "import json; m=json.load(open('$results/paper-run/metrics.json')); print(f\"val ppl {m['best_mean_val_ppl']:.4f}, {m['total_elapsed_seconds']:.2f} s (paper: 17.5529, 16.94 s)\")")"
else
  status "paper-style run" "FAILED (paper-run.log)"
fi

echo; echo "== summary =="; cat "$results/summary.txt"; grep -E "^op=" "$results/measure.log" || tail -n 20 "$results/measure.log"
