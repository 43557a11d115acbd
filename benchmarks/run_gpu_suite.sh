#!/usr/bin/env bash
# The GPU suite in one call, on a machine with an NVIDIA GPU:
#   build the extension (CUDA kernels included), run the GPU tests, the GPU benchmarks and profiles.
# Everything lands in one folder: "$OUT" if set, else benchmarks/results/. Logs are named *.log.
#
#   benchmarks/run_gpu_suite.sh                     # all steps
#   STEPS="tests attention" benchmarks/run_gpu_suite.sh   # a subset (e.g. to fit a time limit)
#
# Steps: build tests attention aaconv train profile sanitize ncu (train: AANet training steps and
# per-sample gradients). PYTHON picks the interpreter (default: python). STEP_TIMEOUT (seconds)
# stops a step that runs longer (SIGINT, so pytest still prints its summary; the benchmarks print
# each case as it is measured, so the log keeps what was done) and counts it as failed.
# ATTENTION_ARGS are extra arguments for bench_attention.py (e.g. "--families issue3_aaconv").
# Each step's wall time is appended to times.txt. sanitize:
# compute-sanitizer (memcheck, racecheck) over the CUDA and Triton kernels at the awkward shapes;
# ncu: Nsight Compute reports of one forward and one backward per GPU backend at the AA-Conv
# benchmark shape (clocks left alone), as .ncu-rep and a text summary.
# A failing step does not stop the others; the script exits 1 if any failed and says which.
set -uo pipefail
# A misspelt step would run nothing and report "all steps passed"; a STEP_TIMEOUT that timeout(1)
# cannot read would fail every step: both refused before anything runs.
ALL_STEPS="build tests attention aaconv train profile sanitize ncu"
STEPS="${STEPS:-$ALL_STEPS}"
read -ra steps_given <<< "$STEPS"
if ((${#steps_given[@]} == 0)); then
  echo "STEPS: expected some of: $ALL_STEPS; got none" >&2
  exit 2
fi
for step in "${steps_given[@]}"; do
  if [[ " $ALL_STEPS " != *" $step "* ]]; then
    echo "STEPS: expected some of: $ALL_STEPS; got '$step'" >&2
    exit 2
  fi
done
if [[ -n "${STEP_TIMEOUT:-}" && ! "$STEP_TIMEOUT" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)[smhd]?$ ]]; then
  echo "STEP_TIMEOUT=$STEP_TIMEOUT: expected seconds, as timeout(1) reads them (180, 2.5, 3m)" >&2
  exit 2
fi
# $OUT is taken relative to where the script was called from, before the cd to the repository.
if [[ -n "${OUT:-}" ]]; then
  if ! mkdir -p "$OUT" 2>/dev/null || [[ ! -w "$OUT" ]]; then
    echo "OUT=$OUT: expected a writable folder (it is a file, or cannot be created)" >&2
    exit 2
  fi
  OUT_DIR="$(cd "$OUT" && pwd)"
fi
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
mkdir -p "$OUT_DIR"
failed=()

run_step() {  # run_step NAME CMD...: run CMD, tee its output to NAME.log, remember failures
  local name="$1"
  shift
  echo "=== $name: $*"
  local began=$SECONDS
  local limit=()
  if [[ -n "${STEP_TIMEOUT:-}" ]]; then
    limit=(timeout --signal=INT --kill-after=30 "$STEP_TIMEOUT")
  fi
  if ! ${limit[@]+"${limit[@]}"} "$@" 2>&1 | tee "$OUT_DIR/$name.log"; then
    failed+=("$name")
  fi
  echo "$name $((SECONDS - began)) s" | tee -a "$OUT_DIR/times.txt"
}

wants() { [[ " $STEPS " == *" $1 "* ]]; }
gpu_backends() {  # the GPU backends, one line; a failed import or none at all fails the step
  local found
  found="$("$PY" -c "import aanet_kernels as a; print(' '.join(b for b in a.available_backends('cuda') if b != 'reference'))")"
  if [[ -z "$found" ]]; then
    echo "no GPU backend of aanet_kernels can run here (build failed, or no GPU?)" >&2
    return 1
  fi
  echo "$found"
}

{
  date -u
  nvidia-smi || echo "nvidia-smi: not found"
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"
# Every step needs a GPU: without one, say so now, not once per step (or after a build).
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA GPU is visible to $PY (torch.cuda.is_available() is False, or torch does not" \
    "import): this suite needs one" >&2
  exit 2
fi

# The toolkit root, as the Makefile finds it, unless the caller set one: torch's own guess is the
# folder above the nvcc on PATH, which is wrong where that nvcc is a wrapper script.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for root in /usr/local/cuda /usr/local/cuda-* /opt/cuda; do
    if [[ -f "$root/include/cuda_runtime_api.h" ]]; then
      export CUDA_HOME="$root"
      break
    fi
  done
fi
# --no-build-isolation: compile against the torch installed here; --no-deps: leave it untouched.
wants build && run_step build "$PY" -m pip install --no-build-isolation --no-deps -e .
wants tests && run_step pytest_gpu "$PY" -m pytest -m gpu -rs -q
# shellcheck disable=SC2086  # ATTENTION_ARGS is a list of words
wants attention && run_step bench_attention "$PY" benchmarks/bench_attention.py --device cuda \
  --out-dir "$OUT_DIR" ${ATTENTION_ARGS:-}
if wants aaconv; then
  run_step bench_aaconv "$PY" benchmarks/bench_aaconv.py --device cuda --out-dir "$OUT_DIR"
fi
if wants train; then
  run_step bench_train "$PY" benchmarks/bench_train.py --device cuda --out-dir "$OUT_DIR"
  run_step bench_per_sample_grads "$PY" benchmarks/bench_per_sample_grads.py --device cuda \
    --out-dir "$OUT_DIR"
fi
if wants profile; then
  backends="$(gpu_backends)" || failed+=("profile")
  for backend in $backends; do
    run_step "profile_attention_$backend" "$PY" -m aanet_kernels.profile --device cuda --backend "$backend" \
      --shape 32,8,32,32,16,8 --out-dir "$OUT_DIR/profiles"
    run_step "profile_aaconv_$backend" "$PY" -m aanet_kernels.profile --op aaconv --device cuda \
      --backend "$backend" --shape 32,8,32,32,16,8 --out-dir "$OUT_DIR/profiles"
  done
fi

if wants sanitize; then
  # Small awkward shapes only: every kernel launch runs tens of times slower under the sanitizer.
  for tool in memcheck racecheck; do
    run_step "sanitize_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PY" -m pytest -m gpu -q -x tests/test_cuda_gpu.py tests/test_triton_gpu.py \
      -k "(awkward_shapes or forward_within or gradients_within) and (float32 or bfloat16)"
  done
fi
if wants ncu; then
  mkdir -p "$OUT_DIR/profiles"
  backends="$(gpu_backends)" || failed+=("ncu")
  for backend in $backends; do
    for mode in fwd bwd; do
      run_step "ncu_${backend}_${mode}" ncu --clock-control none --profile-from-start off \
        --set full -f -o "$OUT_DIR/profiles/ncu_${backend}_${mode}" \
        "$PY" -m aanet_kernels.profile --device cuda --backend "$backend" --mode "$mode" \
        --shape 32,8,32,32,16,8 --single-launch
      run_step "ncu_${backend}_${mode}_summary" ncu --import "$OUT_DIR/profiles/ncu_${backend}_${mode}.ncu-rep" \
        --page details --section SpeedOfLight --section Occupancy --section LaunchStats
    done
  done
fi

if ((${#failed[@]})); then
  echo "GPU suite: FAILED steps: ${failed[*]} (logs in $OUT_DIR)"
  exit 1
fi
echo "GPU suite: all steps passed; results in $OUT_DIR"
