#!/usr/bin/env bash
# The CUDA path's device check in one run, sized for a 15-minute device session (< 10 min):
# the Triton kernel and engine tests on the GPU (bf16 against the CPU path included), each
# kernel against its roofline (bench/gpu_kernels.py), then bench/gpu_bench.py on a random
# gpt-oss-120b built in GPU memory.
#   bash scripts/gpu_check.sh [OUT_DIR]        # on a CUDA machine with torch + triton
# The device image has torch, triton, tiktoken and pytest; moerun runs from the tree.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TIKTOKEN_ENCODINGS_BASE=$PWD/moerun/data
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
            torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 200 python3 -m pytest -p no:cacheprovider tests/test_gpu_moe.py tests/test_gpu_norm.py \
    tests/test_gpu_attention.py tests/test_gpu_engine.py 2>&1 | tee "$out/tests.log"
timeout 90 python3 bench/gpu_kernels.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
timeout 300 python3 bench/gpu_bench.py --budget-s 180 --profile --json "$out/gpu_bench.json" 2>&1 \
    | tee "$out/bench.log"
