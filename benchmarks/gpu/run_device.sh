#!/usr/bin/env bash
# The one script to run on a machine with a CUDA GPU, from a checkout of this repository:
#   bash benchmarks/gpu/run_device.sh
# It builds nothing: the Triton kernels compile on first use. It runs the `gpu`-marked tests of the
# Triton backend and the trainer's two-step run on CUDA (with a timeout), then the benchmark, and
# writes everything under $OUT (default benchmarks/results/gpu): gpu_tests.log, gpu_tests.xml,
# gpu_bench.{csv,jsonl}, bench.log, nvidia-smi.txt. The benchmark's check and target lines and
# its table are printed last, then one status line.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu}"
export OUT
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
PY="${PYTHON:-python3}"
# 240 + 270 s: the whole script ends inside a 540 s device call.
TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"

(nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)") \
    > "$OUT/nvidia-smi.txt" 2>&1

# Compiling the kernels' specialisations dominates the tests on a fresh machine: spread them over
# processes when pytest-xdist is installed (one GPU is enough for these small tests, and Triton's
# on-disk cache is shared). TEST_WORKERS=0 runs them in one process.
WORKERS="${TEST_WORKERS:-8}"
XDIST=()
if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$WORKERS"); fi

echo "== gpu tests (timeout ${TEST_TIMEOUT}s, ${XDIST[*]:-one process})"
# -v: one line per result as it happens, so a run stopped by the timeout (which leaves no junit
# file and no summary) still shows what passed and what failed.
timeout "$TEST_TIMEOUT" "$PY" -m pytest -v -m gpu tests/test_triton.py tests/test_covariance.py tests/test_trainer.py tests/test_integrations_openrlhf.py tests/test_rollout_correction.py -p no:cacheprovider "${XDIST[@]}" \
    --durations=10 --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -n 20
tail -n 12 "$OUT/gpu_tests.log"
echo "gpu tests: $(grep -cE ' PASSED( |$)' "$OUT/gpu_tests.log") passed, $(grep -cE ' FAILED( |$)' "$OUT/gpu_tests.log") failed, $(grep -cE ' ERROR( |$)' "$OUT/gpu_tests.log") errors as they ran (rc=$test_rc)"

echo "== benchmark (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu/run_gpu.py --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -n 110 "$OUT/bench.log"
echo "gpu tests rc=$test_rc, benchmark rc=$bench_rc (124 = timed out); results in $OUT"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
