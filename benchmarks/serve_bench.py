"""Load an OpenAI-compatible server with concurrent streamed completions (loopback only).

Starts `vllm-dpq serve CKPT` on 127.0.0.1 (or uses --url), sends N requests with C in flight,
each streamed, and measures time to first token (TTFT), inter-token latency (ITL), and
tokens/s; with --check it also verifies that every greedy output equals the same prompt run
alone, and that malformed requests get a 4xx while the server stays up. Bounded: N requests,
--timeout seconds in total.

    python benchmarks/serve_bench.py bf16=MODEL_DIR dpq=CKPT --requests 64 --concurrency 16 --check
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --model NAME --requests 32

Several checkpoints are served one after the other, each by a fresh server, with the same load:
the table gives each one's figures and its tokens/s as a ratio of the first's.
Writes OUT.json, OUT.md and OUT.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The three primary colours are",
    "Water boils at a temperature of", "A good breakfast consists of", "The history of the printing press",
    "In mathematics, a prime number is", "The best way to learn a language is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, log_path: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [sys.executable, "-m", "vllm_dpq.cli", "serve", ckpt, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--enforce-eager", "--gpu-memory-utilization", "0.3", *extra]
    log = log_path.open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log_path: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"server at {url} not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(url: str, body: dict, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stream_completion(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streamed greedy completion: its text, TTFT and inter-token gaps."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, text = [], []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            piece = chunk["choices"][0].get("text", "")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    if not times:
        raise RuntimeError("empty stream")
    return {"text": "".join(text), "ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])],
            "chunks": len(times), "latency": times[-1] - t0}


def run_load(url: str, model: str, requests: int, concurrency: int, max_tokens: int, timeout: float) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(stream_completion, url, model, p, max_tokens, timeout) for p in prompts]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result(timeout=max(1.0, timeout - (time.perf_counter() - t0))))
            except Exception as e:  # counted, reported
                errors.append(f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "ok": len(results),
        "errors": errors, "wall_s": wall, "output_tokens_per_s": sum(r["chunks"] for r in results) / wall,
        "ttft_s": {"p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99)},
        "itl_s": {"p50": pct(itl, 0.5), "p90": pct(itl, 0.9), "p99": pct(itl, 0.99),
                  "mean": statistics.fmean(itl) if itl else float("nan")},
        "texts": [r["text"] for r in results], "prompts": prompts,
    }


def check_consistency(url: str, model: str, load: dict, max_tokens: int, timeout: float) -> list[str]:
    """Greedy outputs under load equal each prompt run alone; malformed requests get 4xx."""
    problems = []
    alone = {p: stream_completion(url, model, p, max_tokens, timeout)["text"] for p in sorted(set(load["prompts"]))}
    for p, t in zip(load["prompts"], load["texts"]):
        if t != alone[p]:
            problems.append(f"output under load differs for {p!r}: {t!r} vs {alone[p]!r}")
    for body in ({"model": model, "prompt": "x", "max_tokens": -1},
                 {"model": "no-such-model", "prompt": "x"},
                 {"model": model, "prompt": "x", "temperature": "hot"},
                 {"model": model}):
        code, _ = post(f"{url}/v1/completions", body, timeout)
        if not 400 <= code < 500:
            problems.append(f"malformed request {body} answered {code}, expected 4xx")
    req = urllib.request.Request(f"{url}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=timeout)
        problems.append("invalid JSON accepted")
    except urllib.error.HTTPError as e:
        if not 400 <= e.code < 500:
            problems.append(f"invalid JSON answered {e.code}")
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        if r.status != 200:
            problems.append("server unhealthy after malformed requests")
    return problems


def measure(a, checkpoint: str | None, log: Path) -> dict:
    """Serve one checkpoint (or use --url), load it, optionally check it."""
    proc = None
    url = a.url
    try:
        if not url:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(checkpoint, port, log)
            wait_healthy(url, proc, 600, log)
        model = a.model
        if not model:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
                model = json.loads(r.read())["data"][0]["id"]
        stats = run_load(url, model, a.requests, a.concurrency, a.max_tokens, a.timeout)
        if a.check:
            stats["problems"] = check_consistency(url, model, stats, a.max_tokens, a.timeout)
    finally:
        if proc is not None:
            stop_server(proc)
    return stats


def table(runs: dict[str, dict]) -> str:
    base = next(iter(runs))
    lines = [f"| config | requests | concurrency | ok | output tok/s | ratio vs {base} | TTFT p50/p90/p99 s | "
             "ITL p50/p90/p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, st in runs.items():
        t, i = st["ttft_s"], st["itl_s"]
        lines.append(f"| {name} | {st['requests']} | {st['concurrency']} | {st['ok']} | {st['output_tokens_per_s']:.1f} | "
                     f"{st['output_tokens_per_s'] / runs[base]['output_tokens_per_s']:.2f} | "
                     f"{t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f} | "
                     f"{1e3 * i['p50']:.0f} / {1e3 * i['p90']:.0f} / {1e3 * i['p99']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    qs = ("p50", "p90", "p99")
    width = 0.8 / len(runs)
    for j, (name, st) in enumerate(runs.items()):
        xs = [k + j * width for k in range(len(qs))]
        ax[0].bar(xs, [st["ttft_s"][q] for q in qs], width, label=name)
        ax[1].bar(xs, [1e3 * st["itl_s"][q] for q in qs], width, label=name)
    for a_, title in zip(ax[:2], ("time to first token (s)", "inter-token latency (ms)")):
        a_.set_xticks([k + 0.4 - width / 2 for k in range(len(qs))], qs)
        a_.set_title(title)
        a_.legend(fontsize=8)
    ax[2].bar(list(runs), [st["output_tokens_per_s"] for st in runs.values()])
    ax[2].set_title("output tokens/s")
    st = next(iter(runs.values()))
    fig.suptitle(f"{st['requests']} streamed requests, {st['concurrency']} concurrent, {st['max_tokens']} tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="*", help="[NAME=]CHECKPOINT to start with `vllm-dpq serve` on 127.0.0.1, "
                   "one after the other (the first is the baseline of the ratios)")
    p.add_argument("--url", help="use a running server instead (loopback or your own host)")
    p.add_argument("--model", help="model name on that server (default: its first model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole load, and per request")
    p.add_argument("--check", action="store_true", help="also check outputs vs one-by-one and 4xx on bad input")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve_bench")
    a = p.parse_args()
    if bool(a.url) == bool(a.checkpoint):
        p.error("give CHECKPOINT(s) to serve, or --url (not both)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    configs = {"server": None} if a.url else {}
    for c in a.checkpoint:
        name, sep, path = c.partition("=")
        name, path = (name, path) if sep and not Path(c).exists() else (Path(c).name, c)
        configs[name] = os.path.expanduser(path)
    runs = {}
    for name, path in configs.items():
        runs[name] = measure(a, path, a.out.with_name(f"{a.out.name}.{name}.server.log"))
        print(f"{name}: {runs[name]['ok']}/{a.requests} ok, {runs[name]['output_tokens_per_s']:.1f} tok/s", flush=True)
    text = table(runs)
    a.out.with_suffix(".json").write_text(json.dumps(
        {"configs": configs, "runs": {n: {k: v for k, v in st.items() if k != "texts"} for n, st in runs.items()},
         "table": text}, indent=1).replace(str(Path.home()), "~"))
    a.out.with_suffix(".md").write_text(text)
    print(text)
    plot(runs, a.out.with_suffix(".png"))
    bad = 0
    for name, st in runs.items():
        for e in st["errors"] + st.get("problems", []):
            print(f"PROBLEM ({name}):", e)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
