#!/usr/bin/env bash
# The CUDA checks in one run (issue 6), for a GPU machine with PyTorch but without this
# project installed: every CUDA backend's Set5 x4 PSNR delta (tests), the inference table
# against eager fp32 on the same card, and `rlfn profile --device cuda` (CUDA-event timing,
# max allocated memory). Reference data: $RLFN_SHARED (default ../shared).
#   bash bench/gpu_checks.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
shared=${RLFN_SHARED:-../shared}
py=${PYTHON:-python3}
nvidia-smi -L | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/gpu.txt"
$py -m pytest tests/test_infer.py -k "cuda" -q -s -p no:cacheprovider 2>&1 | tee "$out/tests_cuda.txt"
$py bench/inference.py --device cuda --max-images "${MAX_IMAGES:-40}" \
    --json "$out/inference_cuda.json" 2>&1 | grep -v torchvision | tee "$out/inference_cuda.txt"
$py -m rlfn profile --model "$shared/pretrained/rlfn_ntire_x4.pth" --scale 4 --device cuda \
    --backend cuda_graphs --input-dir "$shared/data/div2k_test_lr_x4" \
    --json "$out/profile_cuda.json" 2>&1 | tee "$out/profile_cuda.txt"
