#!/usr/bin/env bash
# One-shot GPU check for the DPQ W4A8 kernels (torch + Triton only: no vLLM, no network,
# nothing pip-installed). Prints the GPU and versions, checks every GPU backend against the
# CPU reference (PASS/FAIL lines, a summary), then runs the GEMM benchmark (quick form).
# Writes gpu_check.log, gpu_check.json, gemm_g128.json/.png, gemm_g32.json/.png to $OUT if
# set, else results/. Exit status: 0 all passed, 1 a check failed, 2 no CUDA device.
# Runs in about 4-7 minutes on an H100/H200; extra arguments go to benchmarks/gpu_check.py
# (e.g. --skip-bench, --full-bench, --check-budget-s 200).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-results}"
mkdir -p "$OUTDIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silence Triton 3.9's notice; kernels set their own
unset TRITON_INTERPRET VLLM_DPQ_BACKEND VLLM_DPQ_TRITON_CONFIG VLLM_DPQ_TRITON_RNE
PY="${PYTHON:-python3}"
nvidia-smi -L 2>/dev/null || true
"$PY" benchmarks/gpu_check.py --out-dir "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
