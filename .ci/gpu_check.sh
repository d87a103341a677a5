#!/usr/bin/env bash
# Every GPU check in one run (not part of CI): the gpu-marked tests, compute-sanitizer
# memcheck and racecheck on a small workload, the CUDA bench against PyTorch, and an
# Nsight Compute per-kernel profile of the LeNet step.  Run from the checkout on the
# device machine:   OUT=/some/dir bash .ci/gpu_check.sh
# Each step is bounded by `timeout` and tees its log into $OUT (7 files), so
# partial output survives a step that runs out of time.  Budget: at most 7.3 minutes
# (the sum of the timeouts), typically well under 7.
set -x
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/graphc_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GRAPHC_CACHE_DIR="${GRAPHC_CACHE_DIR:-/tmp/graphc_gpu_cache}"
PY=${PYTHON:-python}

{ nvidia-smi; $PY -c "import numpy, torch; print('numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.is_available())"; which nvcc ptxas compute-sanitizer ncu; } 2>&1 | tee "$OUT/env.log"

# 1. gpu-marked tests and the recurrent tests (<= 90 s)
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_gpu.py tests/test_cuda_rnn.py 2>&1 | tee "$OUT/gpu_tests.log"

# 2. the workload plain, then under compute-sanitizer memcheck and racecheck
#    (shared-memory hazards) (<= 160 s)
{
  timeout 40 $PY .ci/gpu_sanitize.py; echo "plain run rc=$? (also fills the cubin cache)"
  timeout 60 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "memcheck rc=$?"
  timeout 60 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "racecheck rc=$?"
} 2>&1 | tee "$OUT/sanitizer.log"

# 3. the bench against PyTorch (<= 130 s; ResNet-50 batch 32 last, the first to lose)
timeout 130 $PY -m graphc.backends.cuda.bench --repeat 20 --only matmul,conv,lenet,rnn,lstm,resnet1,resnet32 2>&1 | tee "$OUT/bench.log"

# 4. the static report next to the measurement
timeout 20 $PY -m graphc.backends.cuda.bench --static --only lenet 2>&1 | tee "$OUT/static.log"

# 5. per-kernel device times of the LeNet step (first ~70 kernels: one step)
timeout 40 ncu --csv --metrics gpu__time_duration.sum --launch-count 70 \
  $PY -m graphc.backends.cuda.bench --only lenet --repeat 1 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$?" | tee -a "$OUT/ncu.err"
ls -l "$OUT"
