"""Host memory and time of `vllm-dpq quantize --method dpq` as models grow (issue: calibrate the
models people serve). Synthetic random Llama-style models (benchmarks/synthetic_model.py: bf16
shards + model.safetensors.index.json, built in --work, never committed) are quantized in a
fresh process each, with few calibration windows (memory and per-layer cost, not accuracy):

  depth  one width (--depth-width) at --depths decoder layers. Target: peak RSS at the deepest
         within 10% of the shallowest (holds only once calibration streams layers from disk).
  width  --widths at --width-layers layers (default up to a 1.55B-parameter model): peak RSS
         against the largest decoder layer's bytes, and the formula fitted on all runs,
         peak GiB ~= a + b * layer GiB + d * model GiB + 2 * activation GiB (bf16 bytes; the
         activations, tokens x hidden x calibration-dtype bytes held twice for all windows, are
         counted, too small to fit here), for Llama-3-70B and Qwen2.5-72B at 128 x 512 tokens.
  compare calibration time of llm-compressor's GPTQ (W4, group 32, lm_head kept) on the
         depth sweep's shallowest model, same windows, same machine, same run; "not installed"
         when `llmcompressor` does not import in --compare-python. llmcompressor pins its own
         transformers / compressed-tensors: install the `[bench]` extra in a venv of its own
         and point --compare-python at it.

Peak RSS is the quantize process's own high-water mark (VmHWM, polled). The JSON also keeps
os.wait4's ru_maxrss and the command's --stats-json peak_rss_gib, which start from the
launcher's peak (Linux keeps it over exec): models are built in a child to keep this one small.

    python benchmarks/calib_scale.py                  # full: depths 4,16,64 x 512; widths 1024,1536,2048 x 26
    python benchmarks/calib_scale.py --quick          # tiny sizes: a smoke run of a few minutes
    python benchmarks/calib_scale.py --widths 256 --depths 4,16 --depth-width 256 --width-layers 4

Writes OUT_DIR/calib_scale.json (after every run), .md and .png and prints the table.

Length: one experiment (three sweeps, the formula fit, the comparison) and its report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic_model import Shape, llama_width

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "austen_sensesensibility.txt"
GIB = 2**30
DEPTH_TARGET = 1.10  # peak RSS at the deepest / at the shallowest model
ACT_COPIES = 2  # hidden states held for every window: the layer's inputs and its reference outputs
CLI_TOKENS = 128 * 512  # `vllm-dpq quantize` defaults --num-samples 128 --seq-len 512
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
REFERENCE_MODELS = {  # from the models' public config.json files
    "Llama-3-70B": Shape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=128256),
    "Qwen2.5-72B": Shape(hidden=8192, intermediate=29568, heads=64, kv_heads=8, layers=80, vocab=152064,
                         qkv_bias=True),
}

LLMC_RUNNER = r'''
import json, sys, time
spec = json.loads(sys.argv[1])
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
from calibration.data import calibration_windows
ids = calibration_windows(AutoTokenizer.from_pretrained(spec["model"]), spec["data"], spec["num_samples"],
                          spec["seq_len"], 0)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16)
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
t = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=spec["seq_len"])
print("RESULT " + json.dumps({"calibration_seconds": time.perf_counter() - t}), flush=True)
'''


def run_measured(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run cmd (output to log); its exit code, wall seconds and peak RSS.

    max_rss_gib is the child's own high-water mark (VmHWM of /proc/PID/status, polled every
    0.1 s: its address space only). ru_maxrss_gib is os.wait4's, which Linux carries over
    exec from the parent's address space at the fork: it is at least this process's peak."""
    t0 = time.perf_counter()
    hwm = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            hwm = max(hwm, _vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "max_rss_gib": hwm * 1024 / GIB,
            "ru_maxrss_gib": usage.ru_maxrss * 1024 / GIB}  # both in KiB on Linux


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")), 0)
    except OSError:  # already gone
        return 0


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _error(log: Path, rc: int) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"exit code {rc}: " + (lines[-1][:300] if lines else "no output")


def sizes(shape: Shape, tokens: int, itemsize: int) -> dict:
    """The byte counts the formula uses, in GiB (and the fp32 layer size for the table)."""
    return {"params": shape.params(), "layer_gib": shape.layer_params() * 2 / GIB,
            "layer_fp32_gib": shape.layer_params() * 4 / GIB, "model_gib": shape.params() * 2 / GIB,
            "act_gib": ACT_COPIES * tokens * shape.hidden * itemsize / GIB}


def build(shape: Shape, a) -> Path:
    """The synthetic model, built in a child process: this one stays small, because a child's
    ru_maxrss (and the peak the quantize command reports) starts from this process's peak."""
    folder = a.work / _model_name(shape)
    cmd = [sys.executable, "-m", "benchmarks.synthetic_model", str(folder), "--shape", json.dumps(asdict(shape)),
           "--data", str(a.data)]
    m = run_measured(cmd, a.work / f"build-{folder.name}.log", a.timeout, _child_env())
    if m["rc"] != 0:
        raise SystemExit(f"building {folder.name} failed: {_error(a.work / f'build-{folder.name}.log', m['rc'])}")
    return folder


def quantize_run(sweep: str, shape: Shape, a) -> dict:
    model = build(shape, a)
    out = a.work / "ckpt"
    stats, log = a.work / "stats.json", a.work / f"{sweep}-{_model_name(shape)}.log"
    stats.unlink(missing_ok=True)
    method = a.width_method if sweep == "width" else "dpq"  # the depth sweep (and compare row) is always dpq
    cmd = [sys.executable, "-m", "vllm_dpq.cli", "quantize", str(model), str(out), "--data", str(a.data),
           "--method", method, "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len),
           "--calib-dtype", a.calib_dtype, "--stats-json", str(stats), "--overwrite",
           *(["--device", a.device] if a.device else [])]
    print(f"{sweep}: quantizing {_model_name(shape)} ({shape.params() / 1e9:.3f}B parameters)", flush=True)
    m = run_measured(cmd, log, a.timeout, _child_env())
    shutil.rmtree(out, ignore_errors=True)
    if a.delete_models:
        shutil.rmtree(model, ignore_errors=True)
    dtype = next((ln.split()[2] for ln in log.read_text(errors="replace").splitlines()
                  if ln.startswith("calibration dtype: ")), a.calib_dtype)
    run = {"sweep": sweep, "method": method, "shape": asdict(shape), "calib_dtype": dtype, "wall_s": m["wall_s"],
           "peak_rss_gib": m["max_rss_gib"], "ru_maxrss_gib": m["ru_maxrss_gib"],
           **sizes(shape, a.num_samples * a.seq_len, ITEMSIZE.get(dtype, 2))}
    if m["rc"] != 0 or not stats.exists():
        run.pop("peak_rss_gib")
        return {**run, "error": _error(log, m["rc"])}
    s = json.loads(stats.read_text())
    return {**run, "calibration_s": s["calibration_seconds"], "total_s": s["total_seconds"],
            "stats_peak_rss_gib": s["peak_rss_gib"]}


def llmcompressor_run(shape: Shape, a) -> dict:
    """llm-compressor's GPTQ on the same model, or {'error': 'not installed'}."""
    probe = subprocess.run([a.compare_python, "-c", "import llmcompressor, datasets"], capture_output=True)
    if probe.returncode != 0:
        return {"error": "not installed"}
    model = build(shape, a)
    spec = {"model": str(model), "data": str(a.data), "num_samples": a.num_samples, "seq_len": a.seq_len}
    log = a.work / f"llmcompressor-{_model_name(shape)}.log"
    print(f"compare: llm-compressor GPTQ on {_model_name(shape)}", flush=True)
    m = run_measured([a.compare_python, "-c", LLMC_RUNNER, json.dumps(spec)], log, a.timeout, _child_env())
    line = next((ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")), None)
    if m["rc"] != 0 or line is None:
        return {"error": _error(log, m["rc"])}
    return {**json.loads(line[7:]), "wall_s": m["wall_s"], "peak_rss_gib": m["max_rss_gib"]}


def _model_name(shape: Shape) -> str:
    return f"llama-h{shape.hidden}-i{shape.intermediate}-L{shape.layers}"


TERMS = ("const", "layer_gib", "model_gib")


def fit_formula(runs: list[dict]) -> dict | None:
    """Least squares of peak - ACT_COPIES * activations on [1, layer GiB, model GiB], the two
    slopes non-negative (a memory cost cannot be negative): the best fit over the subsets of
    slopes that the runs can separate (full rank) and that come out >= 0; a dropped term is 0."""
    import itertools

    import numpy as np

    ok = list({json.dumps(r["shape"], sort_keys=True): r for r in runs if "peak_rss_gib" in r}.values())  # a model once
    y = np.array([r["peak_rss_gib"] - r["act_gib"] for r in ok])
    best = None
    for n in range(len(TERMS) - 1, -1, -1):
        for slopes in itertools.combinations(TERMS[1:], n):
            terms = ("const", *slopes)
            x = np.array([[1.0 if t == "const" else r[t] for t in terms] for r in ok]).reshape(len(ok), len(terms))
            if len(ok) < len(terms) or np.linalg.matrix_rank(x) < len(terms):
                continue
            coef = np.linalg.lstsq(x, y, rcond=None)[0]
            if (coef[1:] < 0).any():
                continue
            err = np.abs(x @ coef - y).max()
            if best is None or err < best[0] - 1e-9:
                best = (float(err), dict(zip(terms, (float(c) for c in coef))))
    if best is None:
        return None
    return {"coef": {t: best[1].get(t, 0.0) for t in TERMS}, "max_residual_gib": best[0], "points": len(ok)}


def predict(fit: dict, shape: Shape, tokens: int, itemsize: int) -> float:
    s = sizes(shape, tokens, itemsize)
    return sum(c * (1.0 if t == "const" else s[t]) for t, c in fit["coef"].items()) + s["act_gib"]


def formula_text(fit: dict) -> str:
    c = fit["coef"]
    return (f"peak GiB ~= {c['const']:.3f} + {c['layer_gib']:.3f} * layer + {c['model_gib']:.3f} * model + "
            f"{ACT_COPIES} * activations (layer, model: bf16 GiB; {fit['points']} models, max residual "
            f"{fit['max_residual_gib']:.3f} GiB)")


def depth_check(runs: list[dict]) -> dict | None:
    d = sorted((r for r in runs if r["sweep"] == "depth" and "peak_rss_gib" in r), key=lambda r: r["shape"]["layers"])
    if len(d) < 2:
        return None
    ratio = d[-1]["peak_rss_gib"] / d[0]["peak_rss_gib"]
    return {"shallow": d[0]["shape"]["layers"], "deep": d[-1]["shape"]["layers"], "ratio": ratio,
            "target": DEPTH_TARGET, "pass": ratio <= DEPTH_TARGET}


def markdown(results: dict) -> str:
    lines = ["| sweep | hidden x MLP, heads / kv | layers | params | largest layer MiB bf16 / fp32 | model GiB bf16 "
             "| calib s | wall s | peak RSS GiB | peak / largest layer bf16 |", "|" + "---|" * 10]
    for r in results["runs"]:
        s = r["shape"]
        head = (f"| {r['sweep']} ({r.get('method', 'dpq')}) | {s['hidden']} x {s['intermediate']}, {s['heads']} / {s['kv_heads']} | {s['layers']} "
                f"| {r['params'] / 1e9:.3f}B | {r['layer_gib'] * 1024:.1f} / {r['layer_fp32_gib'] * 1024:.1f} "
                f"| {r['model_gib']:.2f} |")
        if "error" in r:
            lines.append(head + f" failed: {r['error'].replace('|', '/')} | | | |")
        else:
            lines.append(head + f" {r['calibration_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} "
                                f"| {r['peak_rss_gib'] / r['layer_gib']:.1f} |")
    out = "\n".join(lines) + "\n"
    dc = results.get("depth_check")
    if dc:
        out += (f"\nDepth scaling: peak RSS at {dc['deep']} layers / {dc['shallow']} layers = {dc['ratio']:.2f} "
                f"(target <= {dc['target']:.2f}): {'PASS' if dc['pass'] else 'FAIL'}\n")
    cmp = results.get("compare")
    if cmp:
        ours, theirs = cmp["vllm_dpq"], cmp["llmcompressor"]
        ratio = f"{ours['calibration_s'] / theirs['calibration_seconds']:.2f}" if "error" not in theirs else ""
        cells = theirs["error"] + " | |" if "error" in theirs else \
            f"{theirs['calibration_seconds']:.1f} | {theirs['wall_s']:.1f} | {theirs['peak_rss_gib']:.2f}"
        out += (f"\n| calibration of {cmp['model']} | calibration s | process wall s | peak RSS GiB |\n"
                f"|---|---|---|---|\n| vllm-dpq DPQ | {ours['calibration_s']:.1f} | {ours['wall_s']:.1f} "
                f"| {ours['peak_rss_gib']:.2f} |\n| llm-compressor GPTQ (W4 g32) | {cells} |\n"
                f"\nCalibration time, vllm-dpq / llm-compressor: {ratio or 'n/a'} (goal <= 1.0)\n")
    fit = results.get("fit")
    if fit:
        out += f"\nHost RAM formula, fitted on the runs above: {formula_text(fit)}\n\n" \
               "| model | params | largest layer GiB bf16 | predicted peak RSS GiB (128 x 512 tokens) |\n|---|---|---|---|\n"
        for name, p in results["predictions"].items():
            out += f"| {name} | {p['params'] / 1e9:.1f}B | {p['layer_gib']:.2f} | {p['peak_rss_gib']:.1f} |\n"
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    depth = [r for r in results["runs"] if r["sweep"] == "depth" and "peak_rss_gib" in r]
    if depth:
        ax1.plot([r["shape"]["layers"] for r in depth], [r["peak_rss_gib"] for r in depth], "o-", label="peak RSS")
        ax1.axhline(depth[0]["peak_rss_gib"] * DEPTH_TARGET, color="g", linestyle="--",
                    label=f"target: {DEPTH_TARGET:.2f} x shallowest")
        ax1.set_xscale("log", base=2)
        ax1.set(title=f"depth scaling, hidden {depth[0]['shape']['hidden']}", xlabel="decoder layers",
                ylabel="peak RSS GiB", ylim=(0, None))
        ax1.legend(fontsize=8)
    width = [r for r in results["runs"] if r["sweep"] == "width" and "peak_rss_gib" in r]
    if width:
        xs = [r["layer_gib"] * 1024 for r in width]
        ax2.plot(xs, [r["peak_rss_gib"] for r in width], "o", label="peak RSS")
        fit = results.get("fit")
        if fit:
            ax2.plot(xs, [predict(fit, Shape(**r["shape"]), results["setup"]["tokens"],
                                  ITEMSIZE.get(r["calib_dtype"], 2)) for r in width], "x--", label="formula")
        for r, x in zip(width, xs):
            ax2.annotate(f"{r['params'] / 1e9:.2f}B", (x, r["peak_rss_gib"]), fontsize=7)
        ax2.set(title=f"width scaling, {width[0]['shape']['layers']} layers",
                xlabel="largest decoder layer MiB (bf16)", ylabel="peak RSS GiB", ylim=(0, None))
        ax2.legend(fontsize=8)
    fig.suptitle("vllm-dpq quantize --method dpq: host memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(results: dict) -> None:
    """Depth check, formula and predictions from results['runs']."""
    results["depth_check"] = depth_check(results["runs"])
    results["fit"] = fit_formula(results["runs"])
    if results["fit"]:
        itemsize = ITEMSIZE.get(next((r["calib_dtype"] for r in results["runs"]), "bfloat16"), 2)
        results["predictions"] = {
            name: {"params": s.params(), "layer_gib": sizes(s, 0, 2)["layer_gib"],
                   "peak_rss_gib": predict(results["fit"], s, CLI_TOKENS, itemsize)}
            for name, s in REFERENCE_MODELS.items()}


def write(results: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    summarize(results)
    md = results["table"] = markdown(results)
    (out_dir / "calib_scale.json").write_text(json.dumps(results, indent=1).replace(str(Path.home()), "~"))
    (out_dir / "calib_scale.md").write_text(md)
    plot(results, out_dir / "calib_scale.png")
    return md


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=_ints, default=[4, 16, 64], help="decoder layers of the depth sweep")
    p.add_argument("--depth-width", type=int, default=512, help="hidden size of the depth sweep")
    p.add_argument("--widths", type=_ints, default=[1024, 1536, 2048], help="hidden sizes of the width sweep")
    p.add_argument("--width-layers", type=int, default=26, help="decoder layers of the width sweep")
    p.add_argument("--width-method", default="dpq", help="method of the width sweep (rtn: memory only, fast)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-dtype", default="auto", help="passed to vllm-dpq quantize")
    p.add_argument("--device", default=None, help="passed to vllm-dpq quantize (default: its own)")
    p.add_argument("--data", type=Path, default=DATA, help="calibration text")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (overrides the sizes above)")
    p.add_argument("--work", type=Path, default=ROOT / "results" / "calib-scale-work",
                   help="synthetic models (kept for a rerun unless --delete-models), logs")
    p.add_argument("--delete-models", action="store_true", help="remove each synthetic model after its run")
    p.add_argument("--compare-python", default=sys.executable,
                   help="interpreter with llmcompressor installed (default: this one)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per quantize run")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where calib_scale.json/.md/.png go (default docs/results; results/quick with --quick)")
    p.add_argument("--report-only", action="store_true", help="only render the table and plot from the JSON")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or (ROOT / "results" / "quick" if a.quick else ROOT / "docs" / "results")
    if a.report_only:
        print(write(json.loads((a.out_dir / "calib_scale.json").read_text()), a.out_dir))
        return 0
    if a.quick:
        a.depths, a.depth_width, a.widths, a.width_layers, a.num_samples, a.seq_len = [1, 3], 64, [64, 128], 1, 4, 32
    a.work.mkdir(parents=True, exist_ok=True)
    keys = ("depths", "depth_width", "widths", "width_layers", "width_method", "num_samples", "seq_len", "calib_dtype")
    results = {"setup": {**{k: getattr(a, k) for k in keys}, "device": a.device, "tokens": a.num_samples * a.seq_len, "data": a.data.name,
                         "cpu_count": os.cpu_count()}, "runs": []}
    plan = [("depth", llama_width(a.depth_width, d)) for d in a.depths] + \
           [("width", llama_width(w, a.width_layers)) for w in a.widths]
    done: dict[Shape, dict] = {}
    for sweep, shape in plan:
        if shape in done:  # the same model in both sweeps is quantized once
            results["runs"].append({**done[shape], "sweep": sweep})
            continue
        r = done[shape] = quantize_run(sweep, shape, a)
        results["runs"].append(r)
        print("  " + (f"FAILED: {r['error']}" if "error" in r else
                      f"calib {r['calibration_s']:.1f} s, wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"),
              flush=True)
        write(results, a.out_dir)
    if a.depths:
        shape = llama_width(a.depth_width, min(a.depths))
        ours = next(r for r in results["runs"] if r["sweep"] == "depth" and r["shape"] == asdict(shape))
        if "calibration_s" in ours:
            results["compare"] = {"model": _model_name(shape), "llmcompressor": llmcompressor_run(shape, a),
                                  "vllm_dpq": {k: ours[k] for k in ("calibration_s", "wall_s", "peak_rss_gib")}}
    print(write(results, a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
