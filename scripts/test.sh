#!/usr/bin/env bash
# Install everything, then run the whole test suite (what CI runs): the DPQModifier's tests in the
# llm-compressor venv (.venv-llmc, scripts/llmcompressor_env.sh), then the main suite in .venv
# (its llm-compressor serving test reads the checkpoints that venv writes).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fresh machine gains nothing from keeping a second copy of every wheel in pip's cache.
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
bash scripts/install.sh
start=$SECONDS
bash scripts/llmcompressor_env.sh
echo "llm-compressor venv ready in $((SECONDS - start)) s"
.venv-llmc/bin/python -m pytest -q -ra tests/llmcompressor_venv
. .venv/bin/activate
python -m pytest -q -ra "$@"
