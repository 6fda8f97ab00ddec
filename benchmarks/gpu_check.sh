#!/usr/bin/env bash
# GPU validation in one call, for a GPU machine with torch, Triton and nvcc installed and no network:
# build the CUDA extension in place, run the GPU tests, the GPU benchmarks (wall and kernel-only time, then kernel time
# beside benchmarks/roofline.py's prediction, > 15 % slower flagged) and the host-overhead benchmark; every log and
# result goes to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR                      # full check, <= 6 min on an H100/H200 (build ~1.5, tests ~1.5,
#                                                       # benchmarks <= 2.5 by their time budget, host ~0.5)
#   GPU_CHECK_ORDER="bench tests" GPU_CHECK_BENCH_ARGS="--shapes large,sd15 --dtypes bf16 --time-budget-s 60" \
#       benchmarks/gpu_check.sh OUTDIR                  # a short check when device time is scarce
#
# Environment: TORCH_CUDA_ARCH_LIST (default: the visible GPU's own architecture, so the build compiles once),
# GPU_CHECK_ORDER (default "tests bench host"), GPU_CHECK_TEST_ARGS (pytest arguments), GPU_CHECK_BENCH_ARGS (extra
# arguments of benchmarks.run). Every step runs even if an earlier one failed (except after a failed build); the
# exit status is non-zero if any failed. Results are written as they are produced, so a killed run keeps them.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
stamp() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/gpu_check.log"; }

stamp "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
  echo "cpus: $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

stamp "build (setup.py build_ext --inplace)"
arch=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
t0=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} FDIV_KERNELS_BUILD=aot FDIV_KERNELS_BUILD_CUDA=1 \
    python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED (see build.log)"
  exit 1
fi
stamp "built for sm_${arch/./} in $(( $(date +%s) - t0 )) s"

run_tests() {
  stamp "GPU tests"
  # shellcheck disable=SC2086
  python3 -m pytest ${GPU_CHECK_TEST_ARGS:-tests/test_gpu.py tests/test_ops.py tests/test_triton_kernels.py} \
    -q -rs -p no:cacheprovider --durations=10 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
  local rc=${PIPESTATUS[0]}
  stamp "tests exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

run_bench() {
  stamp "benchmarks"
  # shellcheck disable=SC2086
  python3 -m benchmarks.run --device cuda --out "$OUT" --time-budget-s ${GPU_CHECK_BENCH_BUDGET_S:-150} \
    ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  stamp "benchmarks exit $rc"
  [ "$rc" -eq 0 ] || status=1
  # Measured kernel time beside the roofline's prediction (benchmarks/roofline.py); flags kernels > 15 % slower.
  for json in "$OUT"/cuda-*.json; do
    [ -e "$json" ] || continue
    python3 -m benchmarks.roofline --compare "$json" 2>&1 | tee "$OUT/roofline.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { stamp "roofline: kernels slower than predicted (roofline.md)"; status=1; }
  done
}

run_host() {
  stamp "host overhead per call (tiny shape)"
  python3 -m benchmarks.host --device cuda --out "$OUT" --rounds 10 --calls 300 2>&1 | tee "$OUT/host.log"
  local rc=${PIPESTATUS[0]}
  stamp "host exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

for step in ${GPU_CHECK_ORDER:-tests bench host}; do
  case $step in
    tests) run_tests ;;
    bench) run_bench ;;
    host) run_host ;;
    *) stamp "unknown step $step"; status=1 ;;
  esac
done
stamp "done, exit $status"
exit $status
