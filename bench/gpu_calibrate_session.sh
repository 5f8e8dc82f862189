#!/usr/bin/env bash
# The calibrated-quantize and evaluate benchmarks in one call of the lent GPU machine (docs/benchmarks.md
# section 7). The machine has Python and torch but no package registry: the wheels come in the carried,
# git-ignored folder .whl (listed in section 7) and are installed to /tmp/site.
#
#   bash bench/gpu_calibrate_session.sh            # step 1: bench preset, then 256 routed experts, then profile
#   ROWS=512x2048 TA=300 TB=200 bash bench/gpu_calibrate_session.sh   # DeepSeek-V3's row count (spilled hidden states)
#   bash bench/gpu_calibrate_session.sh modelopt   # step 2, on the same warm machine, carrying .whl_mo
#
# Results land under $OUT (a/, b/: bench_calibrate.json; profile.json; env.txt; logs.tgz).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step=${1:-main}

if [ "$step" = modelopt ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site2 .whl_mo/*.whl || exit 1
    export PYTHONPATH=/tmp/site2:/tmp/site:$PWD
    timeout 540 python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --device cuda --reuse --modelopt_only --out "$OUT/a"
    tar czf "$OUT/logs_modelopt.tgz" -C "$OUT" a 2>/dev/null; rm -f "$OUT"/a/*.log
    exit 0
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__)"
    python3 -m pip list 2>/dev/null | grep -i -E "^(numpy|transformers|safetensors|scipy|accelerate|tokenizers|huggingface|pydantic|rich|pulp|omegaconf) "
    df -h /dev/shm /tmp | tail -2
    free -g | head -2
} > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

rows=${ROWS:-128x2048}
# CUDA and CPU dequantize NVFP4 to the same bits (evaluate dequantizes on the device).
python3 - <<'PY' > "$OUT/dequant_check.txt" 2>&1
import torch
from modelopt_streaming.codec.nvfp4 import dequantize
g = torch.Generator().manual_seed(0)
for shape in [(7168, 1024), (2048, 3584), (24576, 768)]:
    packed = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    scale = (torch.rand(shape[0], shape[1] // 8, generator=g) * 448).to(torch.float8_e4m3fn)
    gs = torch.tensor(3.1e-5)
    for dtype in (torch.bfloat16, torch.float32):
        a = dequantize(packed, scale, gs, dtype)
        b = dequantize(packed.cuda(), scale.cuda(), gs.cuda(), dtype).cpu()
        print(shape, dtype, "equal" if torch.equal(a.view(torch.uint8), b.view(torch.uint8)) else "DIFFER")
PY
# a: the bench preset (2 dense + 1 MoE layer of 24 routed experts), $rows tokens, evaluate on 64 rows.
timeout ${TA:-240} python3 bench/bench_calibrate.py --workdir /dev/shm/mscal --device cuda --skip_modelopt \
    --calib_shape "$rows" --out "$OUT/a"
# b: one MoE layer of DeepSeek-V3's real size (256 routed experts, 22.5 GB of bf16 experts), 64 x 2048 tokens.
timeout ${TB:-240} python3 bench/bench_calibrate.py --workdir /dev/shm/ms256 --device cuda --skip_modelopt \
    --routed_experts 256 --calib_shape 64x2048 --eval_samples 16 --out "$OUT/b"
rm -rf /dev/shm/ms256
# Where a layer's time goes: the engine's forward against from_pretrained's, host<->device copies.
[ "${PROFILE:-1}" = 1 ] && timeout 90 python3 bench/profile_engine.py --src /dev/shm/mscal/src --device cuda --batch 8 --seq_len 2048 \
    > "$OUT/profile.json" 2> "$OUT/profile.log"
tar czf "$OUT/logs.tgz" -C "$OUT" a b profile.log 2>/dev/null
rm -f "$OUT"/a/*.log "$OUT"/b/*.log "$OUT/profile.log"
ls -la "$OUT" "$OUT"/a "$OUT"/b
