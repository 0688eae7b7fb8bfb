"""Accuracy table (docs/EVAL_PROTOCOL.md) on the demo model (or --model): BF16, RTN/GPTQ W4A16,
and RTN / GPTQ (FP8-unaware) / DPQ / DPQ+GAR / the default DPQ recipe W4A8 with static and
dynamic FP8 activations.

Each configuration is calibrated by `vllm-dpq quantize` in a fresh process (so its wall time
and peak RSS are its own), then its perplexity evaluated with the reference forward (OUT.json:
one row per config and group, e.g. `default-g32`, with these fields):
  ppl-w4a16         the INT4 weight alone (s_w * q * s_g)
  ppl-w4a8-static   the served numerics with the checkpoint's static FP8 activation scales
  ppl-w4a8-dynamic  the served numerics with dynamic per-token FP8 activation scales
`--dtype bfloat16` (default): calibration forwards in bf16, the model evaluated in bf16 with
the CPU backend's GEMM numerics (what vLLM on CPU computes). `--dtype float32`: fp32 for the
calibration forwards, the model and the GEMMs (the FP8 products are exact either way), for
CPUs without fast bf16 (AVX2 only), where bf16 matmuls are ~40x slower than fp32. Only rows of
one dtype compare: keep each dtype in its own --out / --work.

    python benchmarks/accuracy.py                         # the main table, groups 32 and 128
    python benchmarks/accuracy.py --configs rtn,dpq --groups 32 --num-samples 16 --eval-windows 8

Writes OUT.json (after every evaluation, so a partial run keeps its numbers), OUT.md, OUT.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "data" / "corpora"

CONFIGS = {  # name -> (label, quantize arguments, evaluate w4a16 too)
    "rtn": ("RTN", ["--method", "rtn", "--paper-recipe"], True),
    "gptq": ("GPTQ (FP8-unaware)", ["--method", "gptq"], True),  # standard GPTQ (gptq.py, AutoGPTQ, INC)
    "gptq-upfront": ("GPTQ, scales up front (FP8-unaware)", ["--method", "gptq", "--paper-recipe"], True),
    "gptq-upfront-mse": ("GPTQ, scales up front + mse (FP8-unaware)",
                         ["--method", "gptq", "--upfront-scales", "--scale-search", "mse"], True),
    "dpq-paper": ("DPQ, paper recipe", ["--method", "dpq", "--paper-recipe"], False),
    "dpq-paper-gar": ("DPQ + GAR, paper recipe", ["--method", "dpq", "--paper-recipe", "--gar"], False),
    # DPQ with our quantizer (nearest codes, mse scales); the default's two levers spelled out
    "dpq": ("DPQ (nearest codes, mse scales)", ["--method", "dpq", "--no-gar", "--no-asym-calib"], False),
    "dpq-gar": ("DPQ + GAR", ["--method", "dpq", "--gar", "--no-asym-calib"], False),
    "dpq-asym": ("DPQ + asymmetric calibration (GPTAQ)", ["--method", "dpq", "--no-gar", "--asym-calib"], False),
    "default": ("DPQ default: GAR + asymmetric calibration", ["--method", "dpq"], False),
    "default-nobos": ("DPQ default, calibration windows without BOS", ["--method", "dpq", "--no-bos"], False),
    "dpq-refit": ("DPQ + refit scales", ["--method", "dpq", "--no-gar", "--no-asym-calib", "--refit-scales"], False),
    "dpq-hfp8": ("DPQ + Hessian of FP8 inputs", ["--method", "dpq", "--no-gar", "--no-asym-calib", "--hessian-fp8"],
                 False),
    "dpq-channel": ("DPQ + per-channel s_w", ["--method", "dpq", "--no-gar", "--no-asym-calib", "--weight-scale",
                                              "channel"], False),
    "default-seq": ("DPQ default + true-sequential", ["--method", "dpq", "--true-sequential"], False),
    "dpq-tune": ("DPQ default + block-wise tuning", ["--method", "dpq", "--tune"], False),
    "default-r1": ("DPQ default + rotation R1", ["--method", "dpq", "--rotate", "r1"], False),
    "default-r1r2": ("DPQ default + rotations R1 + R2", ["--method", "dpq", "--rotate", "r1r2"], False),
    "gptq-r1r2": ("GPTQ (FP8-unaware) + rotations R1 + R2", ["--method", "gptq", "--rotate", "r1r2"], True),
}
DEFAULT = "rtn,gptq,dpq,dpq-gar,default"
DTYPES = ("bfloat16", "float32")


def evaluate(ckpt: Path | None, model_dir: Path, windows, mode: str, activations: str | None,
             dtype: str = "bfloat16") -> float:
    import torch

    dt = getattr(torch, dtype)

    from vllm_dpq.evaluate import perplexity
    from vllm_dpq.reference import load_reference_model

    if ckpt is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
    else:
        model, _ = load_reference_model(ckpt, mode=mode, dtype=dt, activations=activations, gemm_dtype=dt)
    return perplexity(model, windows)


def quantize(model_dir: Path, ckpt: Path, args_q: list[str], group: int, a) -> dict:
    stats, done = ckpt.with_suffix(".stats.json"), ckpt.with_suffix(".args.json")
    cmd = [sys.executable, "-m", "vllm_dpq.cli", "quantize", str(model_dir), str(ckpt),
           *(arg for t in a.calib_text for arg in ("--data", str(t))),
           "--group-size", str(group), "--activations", "static", "--num-samples", str(a.num_samples),
           "--seq-len", str(a.seq_len), "--calib-dtype", a.dtype, "--stats-json", str(stats), "--overwrite", *args_q]
    # a cached checkpoint is reused only if made by the same command (a method's defaults may change)
    if not (ckpt / "dpq_manifest.json").exists() or not stats.exists() or \
            not done.exists() or json.loads(done.read_text()) != cmd[3:]:
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        done.write_text(json.dumps(cmd[3:]))
    return json.loads(stats.read_text())


def markdown(results: dict, groups: list[int], configs: list[str]) -> str:
    cols = [(g, v) for g in groups for v in ("ppl-w4a8-static", "ppl-w4a8-dynamic")]
    head = "| method | " + " | ".join(f"g{g} {v.replace('ppl-w4a8-', 'W4A8 ')}" for g, v in cols) + \
           " | " + " | ".join(f"g{g} W4A16" for g in groups) + " | " + \
           " | ".join(f"g{g} calib s / peak GiB" for g in groups) + " |"
    lines = [head, "|" + "---|" * (1 + len(cols) + 2 * len(groups))]
    bf16 = results.get("bf16")
    fp32 = results.get("setup", {}).get("dtype") == "float32"
    lines.append(f"| BF16{' (fp32 compute)' if fp32 else ''} | " + " | ".join(f"{bf16:.2f}" if bf16 else "" for _ in cols) + " | " +
                 " | ".join(f"{bf16:.2f}" if bf16 else "" for _ in groups) + " | " + " | ".join("" for _ in groups) + " |")
    for c in configs:
        row = [CONFIGS[c][0]]
        for g, v in cols:
            x = results.get(f"{c}-g{g}", {}).get(v)
            row.append(f"{x:.2f}" if x else "")
        for g in groups:
            x = results.get(f"{c}-g{g}", {}).get("ppl-w4a16")
            row.append(f"{x:.2f}" if x else "")
        for g in groups:
            r = results.get(f"{c}-g{g}", {})
            row.append(f"{r['calibration_seconds']:.0f} / {r['peak_rss_gib']:.2f}" if "calibration_seconds" in r else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, groups: list[int], configs: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (2 * len(groups))
    for i, (g, v) in enumerate((g, v) for g in groups for v in ("ppl-w4a8-static", "ppl-w4a8-dynamic")):
        ys = [results.get(f"{c}-g{g}", {}).get(v, 0) for c in configs]
        ax.bar([j + i * width for j in range(len(configs))], ys, width, label=f"g{g} {v.removeprefix('ppl-')}")
    if results.get("bf16"):
        ax.axhline(results["bf16"], color="k", linestyle="--", label=f"BF16 {results['bf16']:.2f}")
    ax.set_xticks([j + width * (2 * len(groups) - 1) / 2 for j in range(len(configs))])
    ax.set_xticklabels([CONFIGS[c][0] for c in configs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    vals = [v for r in results.values() if isinstance(r, dict) for k, v in r.items() if k.startswith("ppl-w4a8")]
    if vals:
        ax.set_ylim(min(vals + [results.get("bf16", min(vals))]) * 0.9, max(vals) * 1.05)
    setup = results.get("setup", {})
    ax.set_title(f"{setup.get('model', '')}, {setup.get('eval_text', '')}, {setup.get('eval_windows', 64)} x 512 tokens")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the demo model, built if needed)")
    p.add_argument("--calib-text", type=Path, action="append",
                   help="calibration text (default: Sense and Sensibility); repeat to mix several in equal shares")
    p.add_argument("--eval-text", type=Path, default=CORPORA / "austen_prideprejudice.txt")
    p.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    p.add_argument("--configs", default=DEFAULT, help=f"comma list from {sorted(CONFIGS)}")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--bos", action="store_true",
                   help="start every evaluation window with the tokenizer's BOS token (511 text tokens after it); "
                        "the protocol's windows have no special tokens, which some models (Gemma) are not trained for")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="compute dtype of calibration forwards and evaluation (float32 on CPUs without fast bf16)")
    p.add_argument("--activations", nargs="+", choices=("static", "dynamic"), default=["static", "dynamic"],
                   help="FP8 activation scales the W4A8 rows are evaluated with (default: both)")
    p.add_argument("--work", type=Path, default=ROOT / "results" / "accuracy-ckpts")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "accuracy")
    p.add_argument("--report-only", action="store_true", help="only render OUT.md / OUT.png from OUT.json")
    a = p.parse_args()
    a.calib_text = a.calib_text or [CORPORA / "austen_sensesensibility.txt"]
    configs = a.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")

    if a.report_only:
        results = json.loads(a.out.with_suffix(".json").read_text())
        md = markdown(results, a.groups, configs)
        a.out.with_suffix(".md").write_text(md)
        plot(results, a.groups, configs, a.out.with_suffix(".png"))
        print(md)
        return 0

    from transformers import AutoTokenizer

    from calibration.demo_model import build_demo_model
    from vllm_dpq.evaluate import TextWindowsError, text_windows

    model_dir = Path(a.model) if a.model else build_demo_model()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jpath = a.out.with_suffix(".json")
    results = json.loads(jpath.read_text()) if jpath.exists() else {}
    if results and results.get("setup", {}).get("dtype", "bfloat16") != a.dtype:
        p.error(f"{jpath} holds {results['setup'].get('dtype', 'bfloat16')} results: use another --out for {a.dtype}")
    if results and results.get("setup", {}).get("bos", False) != a.bos:
        p.error(f"{jpath} holds results {'with' if not a.bos else 'without'} --bos: use another --out")
    results["setup"] = {"dtype": a.dtype, "model": model_dir.name, "calib_text": ", ".join(t.name for t in a.calib_text),
                        "eval_text": a.eval_text.name, "num_samples": a.num_samples, "seq_len": a.seq_len,
                        "eval_windows": a.eval_windows, "bos": a.bos}
    try:
        windows = text_windows(AutoTokenizer.from_pretrained(model_dir), a.eval_text, 512, a.eval_windows, bos=a.bos)
    except TextWindowsError as e:
        p.error(str(e))

    def save():
        jpath.write_text(json.dumps(results, indent=1))

    if "bf16" not in results:
        results["bf16"] = evaluate(None, model_dir, windows, "", None, a.dtype)
        save()
    print(f"BF16 PPL {results['bf16']:.3f}", flush=True)
    for g in a.groups:
        for c in configs:
            key = f"{c}-g{g}"
            ckpt = a.work / key
            r = results.setdefault(key, {})
            r.update({k: v for k, v in quantize(model_dir, ckpt, CONFIGS[c][1], g, a).items()
                      if k in ("calibration_seconds", "total_seconds", "peak_rss_gib")})
            evals = [(f"ppl-w4a8-{act}", "w4a8", act) for act in a.activations]
            if CONFIGS[c][2]:
                evals.append(("ppl-w4a16", "w4a16", "dynamic"))
            for name, mode, act in evals:
                if name not in r:
                    t = time.perf_counter()
                    r[name] = evaluate(ckpt, model_dir, windows, mode, act, a.dtype)
                    print(f"{key:<18} {name:<13} PPL {r[name]:.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
                    save()
    md = markdown(results, a.groups, configs)
    a.out.with_suffix(".md").write_text(md)
    plot(results, a.groups, configs, a.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
