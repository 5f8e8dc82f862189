#!/usr/bin/env bash
# Issue 21's GPU measurements in two calls of the lent GPU machine (docs/benchmarks.md section 8), carrying the
# git-ignored wheel folder .whl (transformers and its needs; see gpu_calibrate_session.sh).
#
#   bash bench/gpu_algorithms_session.sh codecs    # mse kernel check + timings, gptq solves, gptq on the bench preset
#   bash bench/gpu_algorithms_session.sh layers    # mse on the bench preset, gptq on a 256-expert MoE layer
#
# Results land under $OUT: gpu_mse.json, gpu_gptq.json, a/ (gptq), m/ (mse), b/ (gptq, 256 experts), logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env_${1:-codecs}.txt" 2>&1
rows=${ROWS:-128x2048}
case "${1:-codecs}" in
codecs)
    # The Triton mse kernel's bytes against the CPU's, and every codec's throughput on DeepSeek-V3 shapes.
    timeout 150 python3 bench/gpu_mse.py --reps 5 > "$OUT/gpu_mse.log" 2>&1
    # GPTQ's solves on DeepSeek-V3's shapes, the Hessian rate, experts solved together.
    timeout 200 python3 bench/gpu_gptq.py > "$OUT/gpu_gptq.log" 2>&1
    # gptq inside the calibrated quantize, the bench preset (2 dense + 1 MoE layer of 24 experts).
    timeout 240 python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --device cuda --skip_modelopt \
        --calib_shape "$rows" --eval_samples 32 --algorithm gptq --out "$OUT/a"
    tar czf "$OUT/logs_codecs.tgz" -C "$OUT" a gpu_mse.log gpu_gptq.log 2>/dev/null
    rm -f "$OUT"/a/*.log "$OUT"/gpu_*.log
    ;;
layers)
    timeout 200 python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --device cuda --skip_modelopt --reuse \
        --calib_shape "$rows" --eval_samples 0 --algorithm mse --out "$OUT/m"
    rm -rf /dev/shm/mscal
    # One MoE layer of DeepSeek-V3's real size (256 routed experts), 64 x 2048 tokens.
    timeout ${TB:-330} python3 bench/bench_calibrate.py --workdir /dev/shm/ms256 --device cuda --skip_modelopt \
        --routed_experts 256 --calib_shape 64x2048 --eval_samples 0 --algorithm gptq --out "$OUT/b"
    tar czf "$OUT/logs_layers.tgz" -C "$OUT" m b 2>/dev/null
    rm -f "$OUT"/m/*.log "$OUT"/b/*.log
    ;;
esac
ls -la "$OUT" "$OUT"/*/ 2>/dev/null
