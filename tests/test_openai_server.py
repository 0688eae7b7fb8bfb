"""`vllm-dpq serve` end to end on 127.0.0.1 with a real DPQ checkpoint of the demo model:
the OpenAI API (models, chat, completion, streaming), then a bounded load of 64 concurrent
requests whose greedy outputs must equal the same prompts run one by one, and malformed
requests that must get 4xx while the server stays up."""

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import subprocess

    from conftest import corpus
    from vllm_dpq.demo import build_demo_model

    out = tmp_path_factory.mktemp("srv") / "smol-rtn"
    subprocess.run([sys.executable, "-m", "vllm_dpq.cli", "quantize", str(build_demo_model()), str(out),
                    "--data", str(corpus("austen_sensesensibility.txt")), "--method", "rtn", "--num-samples", "8",
                    "--seq-len", "256"], check=True)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from serve_bench import free_port, start_server, stop_server, wait_healthy

    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc = start_server(str(checkpoint), port, log)  # no --quantization flag: auto-detected
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600, log)
        yield url, str(checkpoint), log
    finally:
        stop_server(proc)


def test_openai_api(server):
    from openai import OpenAI

    url, model, log = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [model]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text.strip()
    chunks = [c.choices[0].text for c in client.completions.create(model=model, prompt="Once upon a time",
                                                                     max_tokens=12, temperature=0, stream=True)]
    assert len(chunks) > 1 and "".join(chunks).strip()
    text = log.read_text()
    assert "quantization=dpq" in text and "DPQ: using backend cpu" in text


def test_load_and_malformed_requests(server):
    from serve_bench import check_consistency, run_load

    url, model, _ = server
    stats = run_load(url, model, requests=64, concurrency=64, max_tokens=16, timeout=600)
    assert stats["ok"] == 64, stats["errors"]
    problems = check_consistency(url, model, stats, max_tokens=16, timeout=300)
    assert not problems, problems
