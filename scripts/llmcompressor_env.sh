#!/usr/bin/env bash
# Create the llm-compressor calibration venv (default .venv-llmc; first argument or $LLMC_VENV to
# choose) with llm-compressor 0.14.x and vllm-dpq's DPQModifier, without vLLM. llm-compressor
# pins transformers and compressed-tensors versions that vLLM's own pins exclude, so it cannot
# share the serving venv (scripts/install.sh): calibrate here, serve from the other.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${LLMC_VENV:-.venv-llmc}}
. scripts/disk_check.sh
[ -d "$VENV" ] || need_disk 3 . "the llm-compressor venv ($VENV)"
PY=${PYTHON:-python3}
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch 2.13.0+cpu first, so that nothing pulls a CUDA build
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[llmcompressor]"
python - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
from calibration.llmcompressor import DPQModifier  # noqa: F401 (registers it for YAML recipes)
print(f"installed: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}")
PY
