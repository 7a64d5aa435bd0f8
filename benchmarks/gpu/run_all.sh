#!/usr/bin/env bash
# One GPU session, one invocation, ordered by what a short lease should prove first: build the CUDA
# extension, run the kernel tests on the GPU, measure the kernels against their roofline, train the
# study's configuration on the GPU, then the rest of the test suite. A deadline (default 470 s)
# shortens the later steps so the summary is always written.
#   bash benchmarks/gpu/run_all.sh RESULTS_DIR [SECONDS]              # on the GPU machine
#   bash benchmarks/gpu/run_all.sh RESULTS_DIR [SECONDS] --dry-run    # same code paths, tiny, on a CPU
# The build always runs; GPU_STEPS (default: all) picks among errors kernel-tests measure train
# rest-tests; GPU_DIAGNOSE=0 skips the native-error diagnosis, GPU_SWEEP=0 the launch sweep.
# The training runs use SmolLM2-135M's shape and tokenizer with random weights when
# .gpu_carry/smollm2-shape/ holds them (benchmarks/gpu/carry_smollm2_shape.py writes it; the GGUF is
# too large to send to a lent GPU machine): their seconds and tokens/s are real, their PPL is not.
set -uo pipefail
cd "$(dirname "$0")/../.."
results=${1:-gpu-results}
deadline=$((SECONDS + ${2:-470}))
dry=${3:-}
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$dry" = "--dry-run" ]; then export TRITON_INTERPRET=1; fi

steps=${GPU_STEPS:-errors kernel-tests measure train rest-tests}
want() { [[ " $steps " == *" $1 "* ]]; }
status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$results/summary.txt"; }
# Seconds a step may take: its own cap, or what is left before the deadline (minus 10 s to wrap up).
cap() { local left=$((deadline - SECONDS - 10)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
: > "$results/summary.txt"

python - > "$results/environment.txt" 2>&1 <<'PY'
import datetime, os, torch
print("date", datetime.date.today())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count())
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
import transformers; print("transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$results/environment.txt" 2>/dev/null
nvcc --version 2>/dev/null | tail -n 2 >> "$results/environment.txt"
cat "$results/environment.txt"

start=$SECONDS
device=cuda; [ "$dry" = "--dry-run" ] && device=cpu
if timeout "$(cap 240)" python -c "import sys; from gard_kernels.sketch import native; ok = native.is_available('$device'); print(native.unavailable_reason('$device') or 'built'); sys.exit(not ok)" > "$results/build.log" 2>&1; then
  status "native build ($device)" "ok in $((SECONDS - start)) s"
else
  status "native build ($device)" "FAILED (build.log): $(tail -n 3 "$results/build.log" | tr '\n' ' ' | cut -c1-300)"
fi

# The native op's error paths in their own process: a crash there (as on the first GPU run) must
# not take the other kernel tests down with it.
if want errors; then
  start=$SECONDS
  timeout "$(cap 60)" python -m pytest -q -rfE -p no:cacheprovider "tests/test_native.py::test_clear_errors" > "$results/tests_errors.log" 2>&1
  status "native error paths (rc $?)" "$(tail -n 1 "$results/tests_errors.log" | cut -c1-200) [$((SECONDS - start)) s]"
  [ "${GPU_DIAGNOSE:-1}" = 1 ] && timeout "$(cap 200)" bash benchmarks/gpu/diagnose_native_errors.sh "$results/native-errors" > /dev/null 2>&1
fi

# The kernels, and the tests that move models and data between devices (failed on the first GPU run).
kernel_tests=(tests/test_native.py tests/test_triton.py tests/test_sketch.py tests/test_ring.py tests/test_spectra.py
              tests/test_capture.py tests/test_distributed.py "tests/test_cli.py::test_every_method_trains_on_the_gpu"
              "tests/test_docs_examples.py::test_doc_examples_run[docs/integrations.md]"
              "tests/test_experiments.py::test_lr_sweep_extends_past_an_edge_until_the_best_is_inside")
[ "$dry" = "--dry-run" ] && kernel_tests=(tests/test_native.py "tests/test_triton.py::test_accumulate_adds_into_out" tests/test_ring.py)
if want kernel-tests; then
  start=$SECONDS
  timeout "$(cap 200)" python -m pytest -q -rfE -p no:cacheprovider --durations=8 "${kernel_tests[@]}" \
    --deselect "tests/test_native.py::test_clear_errors" > "$results/tests_kernels.log" 2>&1
  status "kernel tests (rc $?)" "$(tail -n 1 "$results/tests_kernels.log" | cut -c1-200) [$((SECONDS - start)) s]"
fi

# Each sketch row: ms, bound_us (roofline at the datasheet peaks), x_bound = measured / bound,
# of_copy_bw (goal >= 0.70 for bf16 at N8192-d4096). roofline.md holds the bounds for both GPUs.
if want measure; then
  python benchmarks/gpu/roofline.py > "$results/roofline.md" 2>&1
  start=$SECONDS
  timeout "$(cap 200)" python benchmarks/gpu/measure.py "$results" ${dry:+--dry-run} $([ "${GPU_SWEEP:-1}" = 1 ] || echo --no-sweep) > "$results/measure.log" 2>&1
  status "measurements (rc $?)" "[$((SECONDS - start)) s] measure.log, measurements.json"
fi

# The study's training run (100 steps x 4 x 128 tokens, bf16) on the GPU: gard against uniform LoRA.
if want train; then
model_dir=/tmp/smollm2-shape-random
python - "$model_dir" "$dry" > "$results/model.log" 2>&1 <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
out, dry = Path(sys.argv[1]), sys.argv[2] == "--dry-run"
carried = Path(".gpu_carry/smollm2-shape")
if carried.is_dir() and not dry:
    config = AutoConfig.from_pretrained(carried)
else:  # no tokenizer: the runs use --tokenizer bytes
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(out)
if carried.is_dir() and not dry:
    for f in carried.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
print(config.num_hidden_layers, "layers saved to", out)
PY
run_args=(--budget 2570 --seed 0 --precision bf16 --device "$device" --model "$model_dir" --no-progress)
[ -f "$model_dir/tokenizer.json" ] || run_args+=(--tokenizer bytes --max-len 16 --steps 4 --eval-blocks 8 --test-blocks 8 --window 2)
for method in gard uniform; do
  start=$SECONDS
  if timeout "$(cap 90)" python -m gard_kernels finetune --method "$method" "${run_args[@]}" --out "$results/run-$method" > "$results/run-$method.log" 2>&1; then
    status "train $method" "$(python -c "import json; m=json.load(open('$results/run-$method/metrics.json')); print(f\"{m['train_seconds']:.2f} s train, {m['tokens_per_second']:.0f} tokens/s, {m['total_elapsed_seconds']:.2f} s total\")") [$((SECONDS - start)) s with model load]"
  else
    status "train $method" "FAILED (run-$method.log): $(tail -n 2 "$results/run-$method.log" | tr '\n' ' ' | cut -c1-300)"
  fi
done
fi

if want rest-tests; then
rest=(tests); [ "$dry" = "--dry-run" ] && rest=(tests/test_pipeline.py)
skip=()
for t in "${kernel_tests[@]}"; do [[ "$t" == *::* ]] && skip+=(--deselect "$t") || skip+=(--ignore "$t"); done
start=$SECONDS
timeout "$(cap 240)" python -m pytest -q -rfE -p no:cacheprovider "${rest[@]}" "${skip[@]}" > "$results/tests_rest.log" 2>&1
status "rest of the tests (rc $?)" "$(tail -n 1 "$results/tests_rest.log" | cut -c1-200) [$((SECONDS - start)) s]"
fi

echo; echo "== summary =="; cat "$results/summary.txt"
[ -f "$results/measure.log" ] && { grep -E "^op=" "$results/measure.log" | grep -v "^op=sweep" || tail -n 20 "$results/measure.log"; }
