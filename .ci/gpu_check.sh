#!/usr/bin/env bash
# Every GPU check in one run (not part of CI): the gpu-marked tests, compute-sanitizer
# memcheck and racecheck on a small workload, the CUDA bench against PyTorch, and an
# Nsight Compute per-kernel profile of the LeNet step.  Run from the checkout on the
# device machine:   OUT=/some/dir bash .ci/gpu_check.sh
# Each step is bounded by `timeout` and tees its log into $OUT (7 files), so
# partial output survives a step that runs out of time.  Budget: at most 9 minutes
# (the sum of the timeouts); the first full run took under 2.
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
#    (shared-memory hazards), automatic GEMM tiles and the 128x128 tile forced on
#    every GEMM (its double-buffered shared memory and guarded edges) (<= 200 s)
{
  timeout 40 $PY .ci/gpu_sanitize.py; echo "plain run rc=$? (also fills the cubin cache)"
  timeout 50 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "memcheck rc=$?"
  timeout 50 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "racecheck rc=$?"
  GRAPHC_CUDA_GEMM_TILE=128 timeout 30 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "memcheck tile 128 rc=$?"
  GRAPHC_CUDA_GEMM_TILE=128 timeout 30 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 $PY .ci/gpu_sanitize.py; echo "racecheck tile 128 rc=$?"
} 2>&1 | tee "$OUT/sanitizer.log"

# 3. the bench against PyTorch (<= 150 s; ResNet-50 batch 32 last, the first to lose)
timeout 150 $PY -m graphc.backends.cuda.bench --repeat 20 --only matmul,conv,lenet,rnn,lstm,resnet1,resnet32 2>&1 | tee "$OUT/bench.log"

# 4. GEMM tiles A/B on the matmul and the conv (<= 90 s)
timeout 90 $PY -m graphc.backends.cuda.bench --repeat 20 --only matmul,conv --gemm-tiles 16,64,128,128:2,64x128,auto 2>&1 | tee "$OUT/tiles.log"

# 5. per-kernel device times of the LeNet step (first ~70 kernels: one step)
timeout 40 ncu --csv --metrics gpu__time_duration.sum --launch-count 70 \
  $PY -m graphc.backends.cuda.bench --only lenet --repeat 1 > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$?" | tee -a "$OUT/ncu.err"
ls -l "$OUT"
