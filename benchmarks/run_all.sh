#!/usr/bin/env bash
# Run every benchmark on one device and keep the logs.
#   bash benchmarks/run_all.sh cuda [LOG_DIR]   # GPU: also runs the CUDA tests (tests/gpu)
#   bash benchmarks/run_all.sh cpu  [LOG_DIR]   # CPU (slow: about 20 min on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
logs="${2:-benchmark_logs}"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME COMMAND...: tee the output into LOG_DIR/NAME.log, remember a failure
    local name="$1"; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$logs/$name.log" || status=1
}
if [ "$device" = cuda ]; then
    run gpu_tests python3 -m pytest -q -p no:cacheprovider tests/gpu
fi
run bench_sft python3 -m benchmarks.bench_sft --device "$device" --rounds 10 --compile true
run bench_sft_cudnn python3 -m benchmarks.bench_sft --device "$device" --rounds 10 --cudnn-benchmark
run bench_sft_b16 python3 -m benchmarks.bench_sft --device "$device" --rounds 10 --batch 16 --cudnn-benchmark
run profile_sft python3 -m benchmarks.bench_sft --device "$device" --profile
run bench_kd python3 -m benchmarks.bench_kd --device "$device" --rounds 10
run bench_kd_cudnn python3 -m benchmarks.bench_kd --device "$device" --rounds 10 --cudnn-benchmark --no-memory
run bench_kd_b16 python3 -m benchmarks.bench_kd --device "$device" --rounds 10 --batch 16 --cudnn-benchmark --no-memory
run profile_kd_at python3 -m benchmarks.bench_kd --device "$device" --profile at
run profile_kd_fsp python3 -m benchmarks.bench_kd --device "$device" --profile fsp
run bench_models python3 -m benchmarks.bench_models --device "$device"
run bench_data python3 -m benchmarks.bench_data  # CPU work of the DataLoader workers
run bench_scan python3 -m benchmarks.bench_scan  # a split's scan, with and without the header cache
if [ "$device" = cpu ]; then
    run bench_conv python3 -m benchmarks.bench_conv  # BlockConv2d's CPU backward paths
fi
exit $status
