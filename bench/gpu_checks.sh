#!/usr/bin/env bash
# The CUDA checks in one run (issues 6 and 15), for a GPU machine with PyTorch but without
# this project installed; about 8 minutes on an H200, each step under its own time limit so
# that one hang cannot eat the rest:
#   1. bench/inference.py --device cuda: ms/image and Set5 x4 PSNR delta vs eager fp32 of each
#      CUDA backend (the latency goal: >= 3x eager fp32 within 0.01 dB), then the batched
#      throughput at batch 1, 4, 16 (images/s, MP/s, fraction of the bandwidth roofline);
#   2. bench/gpu_profile.py: where a forward's time goes (kernels per forward, busy vs wall,
#      launch gaps, top kernels, achieved GB/s; Chrome traces) for eager and the compiled
#      backends, at batch 1 and 16;
#   3. the CUDA tests: every CUDA backend's Set5 PSNR delta (tests/test_infer.py) and batched
#      vs unbatched outputs on the GPU (tests/test_upscale_batch.py).
# Reference data: $RLFN_SHARED (default ../shared). Through the device tool ../shared does not
# travel: copy Set5, reference_metrics.json, the x4 weights and a few DIV2K test LR images into a
# git-excluded folder of the checkout (under 64 MiB with the tree), carry it, set RLFN_SHARED. Results: OUT_DIR (default bench/results),
# one .txt per step, steps.txt with each step's exit code and seconds.
#   bash bench/gpu_checks.sh [OUT_DIR]
#   BACKENDS="eager fp16 compile_graphs" MAX_IMAGES=10 bash bench/gpu_checks.sh /tmp/out
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export RLFN_SHARED=${RLFN_SHARED:-$PWD/../shared}
py=${PYTHON:-python3}
# bf16, compile and compile_bf16 were measured before (bench/results/inference_cuda_h200.txt);
# BACKENDS="..." adds them back.
read -r -a backends <<< "${BACKENDS:-eager channels_last fp16 cuda_graphs compile_graphs compile_fp16}"
: > "$out/steps.txt"

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log to $out/NAME.txt
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -k 15 "$limit" "$@" > "$out/$name.txt" 2>&1
    rc=$?
    echo "$name: rc=$rc in $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (timed out)')" \
        | tee -a "$out/steps.txt"
    grep -v -e torchvision -e Warning -e warnings.warn "$out/$name.txt" | tail -n 60
}

{ nvidia-smi -L; "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$out/gpu.txt"

step inference_cuda 270 "$py" bench/inference.py --device cuda --sets Set5 \
    --max-images "${MAX_IMAGES:-10}" --backends "${backends[@]}" \
    --batch 1 4 16 --throughput-images 32 --min-batches 2 --json "$out/inference_cuda.json"

step gpu_profile 75 "$py" bench/gpu_profile.py --device cuda --forwards 10 \
    --backend eager cuda_graphs compile_graphs --out "$out/gpu_profile"
step gpu_profile_b16 45 "$py" bench/gpu_profile.py --device cuda --forwards 5 --batch 16 \
    --backend eager compile_graphs --out "$out/gpu_profile"

# compile_fp16 (max-autotune) is left out here: it autotunes every Set5 image size again, which
# alone outran 230 s on torch 2.11 (2026-12-04); its PSNR delta is in inference_cuda.txt.
step tests_cuda 240 "$py" -m pytest tests/test_infer.py tests/test_upscale_batch.py \
    -k "cuda and not compile_fp16" -q -s -p no:cacheprovider --durations=15

echo "results in $out:"; cat "$out/steps.txt"
