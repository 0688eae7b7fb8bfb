"""Offline vLLM throughput, docs/EVAL_PROTOCOL.md: BF16 and DPQ (and any other configuration)
in one invocation, each run in a fresh process, N runs each, in vLLM's default compiled mode
(torch.compile) and in eager mode (enforce_eager), a row each; min / median / max, the ratio
of medians to the first configuration in the same mode, and the median of per-run ratios (run i
against the baseline's run i, minutes apart: robust to load that comes and goes).

Workloads (synthetic token-id prompts from a fixed seed, temperature 0, ignore_eos):
  decode   32 requests x 64 input tokens x 128 output tokens
  prefill  16 requests x 512 input tokens x 16 output tokens
  single    1 request  x 64 input tokens x 256 output tokens (single-stream decode, M = 1:
           what one user chatting with the model sees)

    python benchmarks/throughput.py --config bf16=MODEL_DIR --config dpq=CKPT \\
        [--config bf16-fp32=MODEL_DIR:dtype=float32] [--config fp8=MODEL_DIR:quantization=fp8] \\
        [--runs 3] [--workloads decode,prefill,single] [--modes compiled,eager] [--memory-only]

A configuration is NAME=PATH[:KEY=VALUE,...]: upper-case keys are environment variables,
lower-case keys are LLM() arguments. Each run also records the resident weight memory (every
tensor the loaded model holds, benchmarks.memory.resident_bytes, the same count for every
configuration; vLLM's own "Model loading took" figure too where it logs one, on GPU) and the
KV-cache capacity that vLLM logs. A configuration this vLLM cannot run (say `quantization=fp8`
on a CPU without FP8 support) is reported as failed, with vLLM's error, and the others go on.
`--memory-only` loads each configuration once, in the first of `--modes`. Compiled runs use
vLLM's compile cache (~/.cache/vllm): set VLLM_DISABLE_COMPILE_CACHE=1 after changing a
DPQ_* variable (docs/SERVING.md). Writes OUT.json, OUT.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"decode": (32, 64, 128), "prefill": (16, 512, 16), "single": (1, 64, 256)}
MODES = ("compiled", "eager")

RUNNER = r'''
import json, os, sys, time
spec = json.loads(sys.argv[1])
if __name__ == "__main__":
    import random
    from vllm import LLM, SamplingParams
    llm = LLM(spec["path"], max_model_len=1024, seed=0, **spec["args"])
    try:  # resident weight bytes, counted the same way for every configuration
        from benchmarks.memory import resident_bytes
        per_rank = llm.apply_model(resident_bytes)
        weights_gib = sum(sum(r.values()) for r in per_rank) / 2**30
    except Exception as e:  # an older vLLM without apply_model, say
        print(f"resident weight memory not measured: {e!r}", file=sys.stderr)
        weights_gib = None
    vocab = llm.get_tokenizer().vocab_size if not spec["args"].get("skip_tokenizer_init") else 1000
    out = {}
    for name, (n, inp, outp) in spec["workloads"].items():
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(inp)]} for _ in range(n)]
        params = SamplingParams(temperature=0.0, max_tokens=outp, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        gen = sum(len(r.outputs[0].token_ids) for r in res)
        out[name] = {"seconds": dt, "output_tok_s": gen / dt, "total_tok_s": (gen + n * inp) / dt,
                     "requests_s": n / dt}
    out["resident_weights_gib"] = weights_gib
    print("RESULT " + json.dumps(out), flush=True)
'''


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    path, _, opts = rest.partition(":")
    env, args = {}, {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        if k.isupper():
            env[k] = v
        else:
            try:
                args[k] = json.loads(v)  # numbers, true/false
            except ValueError:
                args[k] = v  # plain strings, e.g. quantization=fp8
    return name, {"path": os.path.expanduser(path), "env": env, "args": args}


def log_figures(log: str) -> dict:
    """Weight memory and KV-cache capacity as vLLM logs them (formats vary by version)."""
    out = {}
    m = re.search(r"Model loading took ([\d.]+) ?GiB", log)
    if m:
        out["vllm_weights_gib"] = float(m.group(1))
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log) or re.search(r"KV cache size: ([\d,]+) tokens", log)
    if m:
        out["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    return out


def run_once(cfg: dict, workloads: dict, eager: bool, timeout: float) -> dict:
    spec = {"path": cfg["path"], "args": {**cfg["args"]}, "workloads": workloads}
    if eager:
        spec["args"].setdefault("enforce_eager", True)
    try:
        import torch

        if not torch.cuda.is_available():
            spec["args"].setdefault("gpu_memory_utilization", 0.3)
    except ImportError:
        pass
    env = dict(os.environ, **cfg["env"])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(resident_bytes), local only
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # benchmarks.memory
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(RUNNER)
    try:
        r = subprocess.run([sys.executable, f.name, json.dumps(spec)], capture_output=True, text=True, env=env,
                           timeout=timeout)
    finally:
        os.unlink(f.name)
    log = r.stdout + r.stderr
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        # the root cause: the first exception message that is not vLLM's generic re-raise
        errors = [m.group(1) for m in re.finditer(r"\b(\w*(?:Error|Exception): .*)", log)]
        errors = [e for e in errors if "initialization failed" not in e] or errors
        print(f"run failed (rc {r.returncode}):\n{log[-8000:]}", file=sys.stderr)
        return {"error": errors[0][:300] if errors else f"exit code {r.returncode}"}
    return {**json.loads(line[7:]), **log_figures(log)}


def memory_only(configs: dict, eager: bool, a) -> int:
    out = a.out.with_name(a.out.name + "-memory")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    base = None
    for name, cfg in configs.items():
        r = results[name] = run_once(cfg, {}, eager, a.timeout)
        gib = r.get("resident_weights_gib")
        if base is None and gib:
            base = (name, gib)
        ratio = f"{gib / base[1]:.2f}" if gib and base else ""
        rows.append(f"| {name} | {r['error'] if 'error' in r else _fmt(gib)} | {ratio} | {r.get('kv_cache_tokens', '')} |")
        print(rows[-1], flush=True)
    table = (f"| config | resident weights GiB | ratio vs {base[0] if base else 'first'} | KV tokens |\n"
             "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    out.with_suffix(".json").write_text(_json({"configs": configs, "runs": results, "table": table}))
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def _json(obj) -> str:
    """JSON for the results file without machine paths: paths under the working directory
    relative to it, the home folder written as ~."""
    return json.dumps(obj, indent=1).replace(str(Path.cwd()) + "/", "").replace(str(Path.home()), "~")


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def summarize(runs: dict, mode_of: dict, first: str, workloads, failed: dict) -> tuple[dict, str]:
    """Median tok/s per (row, workload), and the table: min / median / max, the ratio of medians
    to the first configuration in the same mode (mode_of: row -> mode), and the median of the
    per-run ratios (run i of a row against run i of the baseline, started minutes apart: robust
    to a machine whose load comes and goes)."""
    def base(name):
        return f"{first} ({mode_of[name]})"

    summary = {(n, w): statistics.median(r[w]["output_tok_s"] for r in rs) for n, rs in runs.items() for w in workloads}
    lines = ["| config | workload | output tok/s min / median / max | ratio of medians vs " + first +
             " (same mode) | median of per-run ratios | resident weights GiB | KV tokens |", "|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        for w in workloads:
            xs = sorted(r[w]["output_tok_s"] for r in rs)
            paired = statistics.median(r[w]["output_tok_s"] / b[w]["output_tok_s"] for r, b in zip(rs, runs[base(name)]))
            lines.append(f"| {name} | {w} | {xs[0]:.1f} / {statistics.median(xs):.1f} / {xs[-1]:.1f} | "
                         f"{summary[(name, w)] / summary[(base(name), w)]:.2f} | {paired:.2f} | "
                         f"{_fmt(rs[0].get('resident_weights_gib'))} | {rs[0].get('kv_cache_tokens', '')} |")
    for name, err in failed.items():
        lines.append(f"| {name} | all | failed: {err.replace('|', '/')} | | | | |")
    return summary, "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="NAME=PATH[:KEY=VALUE,...]; first is the baseline")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--modes", default="compiled,eager",
                   help="compiled (vLLM's default, torch.compile) and/or eager (enforce_eager), comma-separated")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "throughput")
    p.add_argument("--memory-only", action="store_true",
                   help="only load each configuration once: resident weight memory and KV-cache capacity")
    a = p.parse_args()
    configs = dict(parse_config(c) for c in a.config)
    modes = a.modes.split(",")
    if set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if a.memory_only:  # the mode changes no weight
        return memory_only(configs, modes[0] == "eager", a)
    if set(a.workloads.split(",")) - set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    workloads = {w: WORKLOADS[w] for w in a.workloads.split(",")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # one row per configuration and mode, e.g. "dpq (compiled)"; its ratio is to the first
    # configuration in the same mode (the modes differ in speed for every configuration)
    rows = {f"{name} ({mode})": (cfg, mode) for mode in modes for name, cfg in configs.items()}
    first = next(iter(configs))
    results = {"configs": configs, "modes": modes, "workloads": workloads, "runs": {}}
    for i in range(a.runs):  # interleaved, so drift of a noisy machine hits every configuration alike
        for name, (cfg, mode) in rows.items():
            if any("error" in r for r in results["runs"].get(name, [])):
                continue  # it failed once: it will fail again
            r = run_once(cfg, workloads, mode == "eager", a.timeout)
            results["runs"].setdefault(name, []).append(r)
            if "error" in r:
                print(f"run {i + 1}/{a.runs} {name}: FAILED: {r['error']}", flush=True)
                continue
            print(f"run {i + 1}/{a.runs} {name}: " + ", ".join(f"{w} {r[w]['output_tok_s']:.1f} tok/s" for w in workloads),
                  flush=True)
            a.out.with_suffix(".json").write_text(_json(results))
    failed = {n: runs[0]["error"] for n, runs in results["runs"].items() if "error" in runs[0]}
    results["runs"] = {n: runs for n, runs in results["runs"].items() if n not in failed}
    for base in (f"{first} ({mode})" for mode in modes):
        if base in failed:
            print(f"the baseline {base} failed: {failed[base]}", file=sys.stderr)
            return 1
    summary, table = summarize(results["runs"], {n: mode for n, (_, mode) in rows.items()}, first, workloads, failed)
    results["failed"] = failed
    results["table"] = table
    a.out.with_suffix(".json").write_text(_json(results))
    a.out.with_suffix(".md").write_text(table)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.5))
        axes = axes if len(workloads) > 1 else [axes]
        for ax, w in zip(axes, workloads):
            names = list(results["runs"])
            meds = [summary[(n, w)] for n in names]
            lo = [m - min(r[w]["output_tok_s"] for r in results["runs"][n]) for n, m in zip(names, meds)]
            hi = [max(r[w]["output_tok_s"] for r in results["runs"][n]) - m for n, m in zip(names, meds)]
            ax.bar(names, meds, yerr=[lo, hi], capsize=4)
            ax.set_title(f"{w}: output tokens/s (median, min-max)")
        fig.tight_layout()
        fig.savefig(a.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
