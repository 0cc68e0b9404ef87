#!/usr/bin/env bash
# The GPU smoke test of issue 14, in under 5 minutes on one GPU:
#   1. the tests marked `gpu` (training on the GPU in bf16 with fused AdamW, eager and torch.compile;
#      checkpoints written on the GPU read on the CPU and back);
#   2. bench/gpu_smoke.py: pretrain gpt-mini 200 steps, LoRA fine-tune, classify and generate through the
#      CLI with --device, then GPT-2 124M (bf16) training and generation next to transformers on the same
#      GPU, tokens/s and MFU, eager and torch.compile, as a markdown table.
#
#   bash bench/gpu_smoke.sh                  # on a CUDA machine (extra arguments go to gpu_smoke.py: --device cuda:1)
#   bash bench/gpu_smoke.sh --cpu-check      # tiny sizes on the CPU: checks the script, measures nothing
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --cpu-check "* ]]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU is visible; \
bash bench/gpu_smoke.sh --cpu-check checks the script on the CPU')"
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_devices.py
fi
exec python bench/gpu_smoke.py "$@"
