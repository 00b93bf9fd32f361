#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes, for a lent GPU machine: the device tool
# runs it from the repository root and brings back what it writes under $OUT (default here:
# /tmp/mmfast-device-check).
#
# That machine has torch, Triton, nvcc, pytest and scipy but no DALI, librosa, PyAV or soundfile,
# and no network. So, first, on the development machine:
#   bash bench/device_check.sh --fetch-wheels     (librosa, PyAV, soundfile and what they need,
#                                                   for that machine's Python 3.12, into .whl/, 37 MB)
# then the device run, carrying .whl: `bash bench/device_check.sh` with carry [".whl"]. It runs:
#   1. the extension built for this GPU (TORCH_CUDA_ARCH_LIST, default 9.0: Hopper);
#   2. the test files that need no data stack, on the GPU: the CUDA kernels against the CPU
#      ones, the Triton kernels compiled (not interpreted), CUDA-graph replays, and every
#      method's step free of host synchronisations (torch.cuda.set_sync_debug_mode("error"));
#   3. bench/grad_modulation.py (float32, bfloat16) and bench/scores.py on CUDA;
#   4. with the wheels: bench/step.py on CUDA, its batches decoded by the naive loader (DALI's
#      wheel is too large to carry): every method's trainer step and overhead, naive vs mmfast,
#      steps under set_sync_debug_mode("error"), the balancing ops replayed as a CUDA graph.
# Without a GPU it runs the same tests on the CPU (their CUDA cases skip) and skips the CUDA
# benchmarks, which is how it is checked on the development machines.
#
#   bash bench/device_check.sh [--no-build] | --fetch-wheels     (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then  # (development machine: pip reaches its package index)
  # The versions the development machines' .venv runs; cffi/pycparser for soundfile, the rest
  # for librosa (numba, scipy, scikit-learn, joblib, msgpack, lazy_loader are there already).
  exec "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    librosa==0.11.0 av==18.1.0 soundfile==0.14.0 soxr==1.1.0 audioread==3.1.0 pooch==1.9.0 decorator==5.3.1 \
    platformdirs==4.14.9 cffi==2.1.1 pycparser==3.12
fi

out=${OUT:-/tmp/mmfast-device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build=1
[ "${1:-}" = "--no-build" ] && build=0
failed=()

step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, records a failure and goes on
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))") || { echo "no torch in $py"; exit 1; }
if [ -d .whl ] && [ "$gpu" = 1 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmfast-site .whl/*.whl \
    && export PYTHONPATH=/tmp/mmfast-site${PYTHONPATH:+:$PYTHONPATH} || echo "== the carried wheels did not install"
fi
if [ "$build" -eq 1 ]; then
  step build "$py" -m pip install --no-build-isolation --no-deps --no-index -e . || { echo "build failed"; exit 1; }
fi
step build_info "$py" -c "import json, mmfast; print(json.dumps(mmfast.build_info(), indent=1))"
step tests "$py" -m pytest -q -rs -p no:cacheprovider tests/ops tests/kernels/test_triton_launch.py \
  tests/methods/test_methods.py tests/methods/test_olm_boost.py tests/models
if [ "$gpu" = 1 ]; then
  step bench_grad_modulation "$py" bench/grad_modulation.py --device cuda --json "$out/grad_modulation.json"
  step bench_grad_modulation_bf16 "$py" bench/grad_modulation.py --device cuda --dtype bfloat16 \
    --json "$out/grad_modulation_bf16.json"
  step bench_scores "$py" bench/scores.py --json "$out/scores.json"
  if "$py" -c "import librosa, av, soundfile" 2> /dev/null; then
    step bench_step "$py" bench/step.py --data-backend naive --epochs 0 --clips 96 --rounds 2 --steps 4 \
      --json "$out/step.json" --markdown "$out/step.md"
  else
    echo "== no librosa/PyAV/soundfile (carry .whl from --fetch-wheels): bench/step.py's CUDA part skipped"
  fi
else
  echo "== no CUDA GPU here: the CUDA benchmarks are skipped (the tests' CUDA cases skipped too)"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "all passed (logs in $out)"
