#!/usr/bin/env bash
# One-shot GPU check for the DPQ W4A8 kernels (torch + Triton + pytest only: no vLLM, no
# compressed-tensors, no network, nothing pip-installed). About 4-7 minutes on an H100/H200:
#
#   1. nvidia-smi and the versions of python, torch, CUDA, Triton;
#   2. the GPU correctness tests, `pytest -m gpu tests/test_triton_gpu.py` (exhaustive fp32->e4m3
#      cast, activation quantization and weight tiles bit for bit, every GPU backend and triton
#      variant against an fp64 evaluation of the spec), then a summary of their worst errors;
#   3. the GEMM benchmark (benchmarks/gemm.py, docs EVAL_PROTOCOL.md: the protocol's four
#      shapes, M 1/16/64/256/1024/4096, bf16 cuBLAS and FP8 W8A8 torch._scaled_mm in the same
#      process, median of 20 runs) at group 128, then group 32 if time allows.
#
# Files in $OUT (else results/): gpu_check.log (everything printed), gpu_tests.xml (junit, with
# per-case properties), gpu_check.json (versions + test summary), gemm_g128.json/.png,
# gemm_g32.json/.png. Exit status: 0 all tests passed, 1 a test failed, 2 no CUDA device.
# Extra arguments go to pytest (e.g. -k gemm, -x). Without a GPU, `--dry-run-cpu` (first
# argument) runs the same steps on CPU under Triton's interpreter: small test cases, and
# `gemm.py --dry-run-cpu` (tiny shapes, meaningless timings) instead of the benchmark.
#
#   bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run-cpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-results}"
mkdir -p "$OUTDIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silence Triton 3.9's notice; kernels set their own
unset TRITON_INTERPRET DPQ_BACKEND DPQ_TRITON_CONFIG DPQ_TRITON_RNE DPQ_TRITON_DEQUANT_M \
    DPQ_GPU_DRY_RUN
DRY=0
if [[ "${1:-}" == "--dry-run-cpu" ]]; then
    DRY=1
    shift
    export TRITON_INTERPRET=1 DPQ_GPU_DRY_RUN=1
fi
export DPQ_GPU_GEMM_BUDGET_S="${DPQ_GPU_GEMM_BUDGET_S:-300}"  # GEMM cases not started by then: skipped
BENCH_BUDGET_S="${BENCH_BUDGET_S:-450}"  # the group-32 benchmark is skipped after this many seconds
PY="${PYTHON:-python3}"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"

main() {
    echo "== GPU"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>/dev/null \
        || nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import gemm, json; print(json.dumps(gemm.versions()))" \
        | tee "$OUTDIR/versions.json"
    if ((!DRY)) && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)"; then
        echo "FAIL no CUDA device: torch.cuda.is_available() is False; nothing checked."
        return 2
    fi

    echo "== correctness: pytest -m gpu"
    timeout 480 "$PY" -m pytest -m gpu tests/test_triton_gpu.py -p no:cacheprovider -v -rfEsw --durations=10 \
        --junitxml="$OUTDIR/gpu_tests.xml" -o junit_family=xunit1 "$@"
    local rc=$?
    "$PY" - "$OUTDIR" "$rc" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, rc = Path(sys.argv[1]), int(sys.argv[2])
summary = {"pytest_exit_status": rc}
try:
    cases = list(ET.parse(out / "gpu_tests.xml").getroot().iter("testcase"))
except (OSError, ET.ParseError) as e:
    cases, summary["junit"] = [], f"unreadable: {e}"
status = lambda c: next((s for s in ("failure", "error", "skipped") if c.find(s) is not None), "passed")
props = lambda c: {p.get("name"): p.get("value") for p in c.iter("property")}
for s in ("passed", "failure", "error", "skipped"):
    summary[s] = sum(status(c) == s for c in cases)
gemm = [props(c) for c in cases if c.get("name", "").startswith("test_gemm") and status(c) == "passed"]
if gemm:
    summary["gemm_worst_excess_error_over_sum_abs"] = max(float(p["excess_error_over_sum_abs"]) for p in gemm)
    summary["gemm_lowest_strict_close_fraction"] = min(float(p["strict_close_fraction"]) for p in gemm)
    summary["gemm_bound"] = 2.0**-10
summary["cast"] = [props(c)["cast"] for c in cases if "cast" in props(c)]
summary["selected"] = sorted({p.get("backend") for p in gemm if p.get("backend")})
summary["failed"] = [c.get("name") for c in cases if status(c) in ("failure", "error")]
versions = json.loads((out / "versions.json").read_text()) if (out / "versions.json").exists() else {}
(out / "gpu_check.json").write_text(json.dumps({"info": versions, "tests": summary}, indent=1))
print("SUMMARY " + json.dumps(summary))
EOF

    echo "== GEMM benchmark"
    if ((DRY)); then
        "$PY" benchmarks/gemm.py --dry-run-cpu --out "$OUTDIR/gemm_dry_run.json" || echo "benchmark dry run failed"
        return $((rc == 0 ? 0 : 1))
    fi
    "$PY" benchmarks/gemm.py --out "$OUTDIR/gemm_g128.json" --group-size 128 --iters 20 \
        --backends bf16,fp8_w8a8,dpq_triton,dpq_triton_fused,dpq_triton_dequant,dpq_scaled_mm \
        || echo "benchmark group 128 failed (exit $?)"
    if ((SECONDS > BENCH_BUDGET_S)); then
        echo "benchmark group 32 skipped: ${SECONDS}s elapsed (BENCH_BUDGET_S=$BENCH_BUDGET_S)"
    else
        "$PY" benchmarks/gemm.py --out "$OUTDIR/gemm_g32.json" --group-size 32 --iters 20 \
            --backends bf16,fp8_w8a8,dpq_triton,dpq_triton_fused || echo "benchmark group 32 failed (exit $?)"
    fi
    echo "done in ${SECONDS}s; files in $OUTDIR"
    return $((rc == 0 ? 0 : 1))
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
