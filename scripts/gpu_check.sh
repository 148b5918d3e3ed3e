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
# Tensor parallelism over NCCL, only where two GPUs are present (untested on real GPUs so far):
# a small random checkpoint scored on 1 and on 2 GPUs, float32, must agree within 1e-4.
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python3 -m moerun.cli synth "$out/tp_ckpt" --preset tiny --layout hf > /dev/null
    args=(score --model "$out/tp_ckpt" --tokens 1,2,3,4,5,6,7,8,9,10,11,12 --dtype float32
          --device cuda --json)
    timeout 120 python3 -m moerun.cli "${args[@]}" > "$out/tp1.json"
    timeout 120 python3 -m moerun.cli "${args[@]}" --tensor-parallel-size 2 > "$out/tp2.json"
    python3 -c "import json, sys; a, b = (json.load(open(f))['logprobs'][1:] for f in sys.argv[1:])
d = max(abs(x - y) for x, y in zip(a, b)); print('TP-2 vs TP-1 max |dlogprob|', d)
assert d < 1e-4" "$out/tp1.json" "$out/tp2.json" 2>&1 | tee "$out/tp.log"
fi
