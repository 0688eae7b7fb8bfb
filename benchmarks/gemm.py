"""GEMM benchmark, docs EVAL_PROTOCOL.md "GEMM (GPU only)".

Shapes (N, K) = (4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096); M in {1, 16, 64,
256, 1024, 4096}. In one process, on one GPU, each timed with CUDA events around every call,
after warm-up, median of >= 20 runs (L2 flushed before each run by writing 256 MiB, outside
the timed region, so that weights come from HBM as they do in a model):

  bf16            torch.matmul(x, W^T), cuBLAS                       (the baseline)
  fp8_w8a8        torch._scaled_mm, per-token s_x / per-channel s_w, X already FP8
                  (GEMM only: the W8A8 bar to beat)
  dpq_triton      TritonBackend.apply: activation quantization + W4A8 GEMM, the path the
                  backend picks for this M (fused, or dequantize + _scaled_mm for M >= 1024)
  dpq_triton_fused    the fused Triton kernel at every M (activation quantization included)
  dpq_triton_dequant  dequantize to FP8 + torch._scaled_mm at every M (quantization included)
  dpq_triton_gemm     the fused GEMM alone, X already FP8 (compare with fp8_w8a8)
  dpq_scaled_mm   ScaledMMBackend.apply: FP8 weights cached at load, torch activation
                  quantization + torch._scaled_mm

TFLOP/s = 2*M*N*K / time; speedups are time(baseline) / time(row). JSON (--out), a PNG plot
next to it (matplotlib if importable), and a printed table.

    PYTHONPATH=. python benchmarks/gemm.py --out results/gemm.json [--quick]

Works without vLLM and without compressed-tensors (weights are random codes packed here).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]
MS = [1, 16, 64, 256, 1024, 4096]
BACKENDS = ["bf16", "fp8_w8a8", "dpq_triton", "dpq_triton_fused", "dpq_triton_dequant", "dpq_triton_gemm",
            "dpq_scaled_mm"]


# ----------------------------------------------------------------------------- no compressed-tensors

def _pack_to_int32(value: torch.Tensor, num_bits: int, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for what vllm_dpq uses (4 bits, along dim 1)."""
    if num_bits != 4 or packed_dim != 1:
        raise NotImplementedError("fallback packer: num_bits=4, packed_dim=1 only")
    u = value.to(torch.int64) + 8
    pad = (-u.shape[1]) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    shifts = torch.arange(0, 32, 4, device=u.device, dtype=torch.int64)
    words = (u.reshape(u.shape[0], -1, 8) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_from_int32(value: torch.Tensor, num_bits: int, shape: torch.Size, packed_dim: int = 1) -> torch.Tensor:
    if num_bits != 4 or packed_dim != 1:
        raise NotImplementedError("fallback unpacker: num_bits=4, packed_dim=1 only")
    shifts = torch.arange(0, 32, 4, device=value.device, dtype=torch.int32)
    nib = (value.unsqueeze(-1) >> shifts) & 0xF
    return (nib.reshape(value.shape[0], -1)[:, : shape[1]] - 8).to(torch.int8)


def install_packing_fallback() -> bool:
    """If compressed-tensors is missing (the GPU machines have torch + Triton only), register a
    minimal stand-in for the two helpers vllm_dpq.packing imports. Returns True if installed."""
    try:
        import compressed_tensors.compressors.pack_quantized.helpers  # noqa: F401
        return False
    except Exception:
        pass
    names = ["compressed_tensors", "compressed_tensors.compressors", "compressed_tensors.compressors.pack_quantized",
             "compressed_tensors.compressors.pack_quantized.helpers"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so the dotted import resolves
        sys.modules[name] = mod
    helpers = sys.modules[names[-1]]
    helpers.pack_to_int32 = _pack_to_int32
    helpers.unpack_from_int32 = _unpack_from_int32
    return True


# ----------------------------------------------------------------------------- setup

def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"unavailable ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    return info


def random_weights(n: int, k: int, group: int, scale_dtype: torch.dtype, device, seed: int = 0, static=False):
    """A layer with random INT4 codes and plausible scales (speed does not depend on values)."""
    from vllm_dpq.kernels.base import W4A8Weights

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    group = k if group == -1 else group
    groups = -(-k // group)
    s_g = (torch.rand(n, groups, generator=g) * 40 + 8).to(scale_dtype)
    s_w = torch.tensor([2.0**-10])
    packed = _pack_to_int32(q, 4, 1)
    s_in = torch.tensor([0.02]) if static else None
    return W4A8Weights(packed.to(device), s_g.to(device), s_w.to(device),
                       None if s_in is None else s_in.to(device), k, group)


class Timer:
    def __init__(self, iters: int, warmup: int, flush: bool, device: torch.device = torch.device("cuda")):
        self.iters, self.warmup, self.cuda = iters, warmup, device.type == "cuda"
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if flush and self.cuda else None

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(self.iters):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:  # --dry-run-cpu only
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
        return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "runs": len(times)}


def bench_shape(n, k, ms, backends, timer, group, scale_dtype, log=print, dev=torch.device("cuda")) -> list[dict]:
    from vllm_dpq.kernels import triton as tw
    from vllm_dpq.kernels.scaled_mm import ScaledMMBackend

    w = random_weights(n, k, group, scale_dtype, dev)
    need_dense = any(b in backends for b in ("bf16", "fp8_w8a8"))
    tstate = tw.prepare_weights(w) if any(b.startswith("dpq_triton") for b in backends) else None
    w8 = w_bf16 = None
    if need_dense:
        w8 = w.fp8_values()  # fp32 [N, K] on the GPU
        w_bf16 = (w8 * w.weight_scale.float()).to(torch.bfloat16)  # the dense equivalent
        w8 = w8.to(torch.float8_e4m3fn)
    s_w = w.weight_scale.float().expand(n).reshape(1, n).contiguous()
    smm = ScaledMMBackend() if "dpq_scaled_mm" in backends else None
    smm_state = smm.prepare(w) if smm else None
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        x8, sx = None, None
        if "fp8_w8a8" in backends or "dpq_triton_gemm" in backends:
            if tstate is not None:
                x8, sx = tw.quantize_activation_fp8(x, None, 448.0)
            else:
                amax = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
                sx = (amax / 448.0).reshape(-1)
                x8 = (x.float() / sx.reshape(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        fns = {
            "bf16": lambda: torch.matmul(x, w_bf16.t()),
            "fp8_w8a8": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx.reshape(-1, 1), scale_b=s_w,
                                                 out_dtype=torch.bfloat16),
            "dpq_triton": lambda: tw.linear(tstate, x),
            "dpq_triton_fused": lambda: tw.linear(tstate, x, path="fused"),
            "dpq_triton_dequant": lambda: tw.linear(tstate, x, path="dequant"),
            "dpq_triton_gemm": lambda: tw.gemm(x8, sx, tstate),
            "dpq_scaled_mm": lambda: smm.apply(smm_state, x),
        }
        timings = {}
        for b in backends:
            t0 = time.time()
            try:
                timings[b] = timer(fns[b])
            except Exception as e:  # keep measuring the others; the row records the error
                timings[b] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            timings[b]["wall_s"] = round(time.time() - t0, 2)
        flops = 2.0 * m * n * k
        for b, t in timings.items():
            row = {"n": n, "k": k, "m": m, "backend": b, **t}
            if "median_ms" in t:
                row["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
                for base in ("bf16", "fp8_w8a8"):
                    if "median_ms" in timings.get(base, {}):
                        row[f"speedup_vs_{base}"] = timings[base]["median_ms"] / t["median_ms"]
                if b == "dpq_triton_dequant" or (b == "dpq_triton" and m >= tstate.settings.dequant_m):
                    row["config"] = "dequant + _scaled_mm"
                elif b.startswith("dpq_triton"):
                    cfg = tstate.settings.config or tw.pick_config(m, n, k, tw.num_sms(dev))
                    row["config"] = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} split{cfg.split_k} " \
                                    f"w{cfg.num_warps} s{cfg.num_stages} {cfg.unpack}"
            rows.append(row)
        log(format_rows([r for r in rows if r["m"] == m]))
        del x, x8
    return rows


def format_rows(rows: list[dict], header: bool = False) -> str:
    lines = []
    if header:
        lines.append(f"{'N':>6} {'K':>6} {'M':>5} {'backend':<19} {'median ms':>10} {'TFLOP/s':>8} "
                     f"{'x bf16':>7} {'x fp8':>7}  config")
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['n']:>6} {r['k']:>6} {r['m']:>5} {r['backend']:<19} ERROR {r.get('error')}")
            continue
        lines.append(f"{r['n']:>6} {r['k']:>6} {r['m']:>5} {r['backend']:<19} {r['median_ms']:>10.4f} "
                     f"{r['tflops']:>8.1f} {r.get('speedup_vs_bf16', float('nan')):>7.2f} "
                     f"{r.get('speedup_vs_fp8_w8a8', float('nan')):>7.2f}  {r.get('config', '')}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib not importable ({type(e).__name__})"
    shapes = sorted({(r["n"], r["k"]) for r in rows}, key=lambda s: (s[1], s[0]))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for b in backends:
            pts = sorted((r["m"], r["speedup_vs_bf16"]) for r in rows
                         if r["backend"] == b and (r["n"], r["k"]) == (n, k) and "speedup_vs_bf16" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={n} K={k}")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs bf16 matmul")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def run(out: Path, shapes=SHAPES, ms=MS, backends=BACKENDS, iters=25, warmup=5, flush=True, group=128,
        scale_dtype=torch.bfloat16, log=print, device=torch.device("cuda")) -> dict:
    if iters < 20 and device.type == "cuda":
        raise ValueError("the protocol asks for the median of >= 20 runs")
    info = versions()
    log(f"GEMM benchmark on {info.get('gpu')} (sm {info.get('capability')}), torch {info['torch']}, "
        f"triton {info['triton']}, group size {group}, group scales {scale_dtype}")
    log(format_rows([], header=True))
    timer = Timer(iters, warmup, flush, device)
    rows = []
    t0 = time.time()
    for n, k in shapes:
        rows += bench_shape(n, k, ms, backends, timer, group, scale_dtype, log=log, dev=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"protocol": "docs/EVAL_PROTOCOL.md GEMM", "info": info,
              "settings": {"iters": iters, "warmup": warmup, "l2_flush": flush, "group_size": group,
                           "group_scale_dtype": str(scale_dtype).replace("torch.", ""), "activations": "dynamic",
                           "timing": "CUDA events per call, median"},
              "wall_s": round(time.time() - t0, 1), "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"json: {out}")
    log(plot(rows, out.with_suffix(".png"), f"W4A8 GEMM, {info.get('gpu')}, g{group}"))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/gemm.json"))
    ap.add_argument("--quick", action="store_true", help="fewer backends (no fused/dequant split), 20 runs")
    ap.add_argument("--shapes", default=None, help="N:K,N:K,... (default: the protocol's four)")
    ap.add_argument("--ms", default=None, help="M values, comma-separated (default: the protocol's six)")
    ap.add_argument("--backends", default=None, help=f"comma-separated subset of {BACKENDS}")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between runs")
    ap.add_argument("--group-size", type=int, default=128, help="-1: per channel")
    ap.add_argument("--scale-dtype", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="harness test without a GPU: TRITON_INTERPRET=1, tiny shapes, CPU timers "
                         "(numbers meaningless)")
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        install_packing_fallback()
        run(args.out, [(48, 64), (32, 96)], [1, 20], BACKENDS, iters=2, warmup=1, device=torch.device("cpu"))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/gemm.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.",
              file=sys.stderr)
        return 2
    install_packing_fallback()
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    backends = args.backends.split(",") if args.backends else BACKENDS
    if args.quick and not args.backends:
        backends = ["bf16", "fp8_w8a8", "dpq_triton", "dpq_triton_fused", "dpq_triton_dequant", "dpq_scaled_mm"]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        ap.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    iters = 20 if args.quick else args.iters
    run(args.out, shapes, ms, backends, iters, args.warmup, not args.no_flush, args.group_size,
        torch.bfloat16 if args.scale_dtype == "bf16" else torch.float8_e4m3fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
