#!/usr/bin/env bash
# One GPU session's checks, run from the repository root on a CUDA machine with torch + triton
# + pytest installed and no network (the device machine): attnlab is copied into a site folder
# (no pip, no dependencies), the kernel tests run natively, then benchmarks/kernels.py.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh --lengths 4096 16384 --head-dims 128
#
# Everything it prints also lands in $OUT (tests.log, bench.log, kernels.md, gpu.txt).
set -o pipefail
OUT=${OUT:-/tmp/attnlab-gpu}
mkdir -p "$OUT" /tmp/attnlab-site/attnlab
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/attnlab-site
cp -r attnlab/. /tmp/attnlab-site/attnlab/
for sub in probes circuits sparsity_stats kernels app; do
    rm -rf "/tmp/attnlab-site/attnlab/$sub" && cp -r "$sub" "/tmp/attnlab-site/attnlab/$sub"
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  date -u; } 2>&1 | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-180}" python3 -P -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/test_kernels.py tests/test_kernels_flex.py tests/test_kernels_index.py \
    tests/test_kernels_benchmark.py 2>&1 | tee "$OUT/tests.log"
echo "tests exit: $?" | tee -a "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/kernels.py --out "$OUT/kernels.md" "$@" 2>&1 \
    | tee "$OUT/bench.log"
echo "benchmark exit: $?" | tee -a "$OUT/bench.log"
