"""GPU check for the DPQ W4A8 kernels: correctness of every GPU backend against the CPU
reference, then the GEMM benchmark. Needs torch + Triton only (no vLLM, no compressed-tensors,
no network). Run from the repository root:

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out-dir "${OUT:-results}"
    (or: bash benchmarks/gpu_check.sh)

Checks, each printed as a PASS/FAIL line, then a summary; exit status 1 on any FAIL:

1. fp32 -> e4m3 rounding, exhaustive: every fp32 value with |x| <= 448 (2.3e9 values) through
   the activation kernel with a static scale of 1 (x / 1 is exact), bit for bit against
   torch's cast (itself checked against torch's CPU cast): the emulated RNE that activations
   use (must be exact), and the hardware conversion that the weight tiles use (WARN, not FAIL,
   if inexact: the tiles only need it exact on <= 11-bit values, which check 3 proves).
2. Activation quantization bit for bit against numerics.quantize_activation (CPU):
   bf16/fp16/fp32, dynamic and static (including a saturating static scale), zero rows.
3. Dequantized weight tiles bit for bit against W4A8Weights.fp8_values() (CPU): group sizes
   32/64/128/96/per-channel, ragged K, bf16/fp8 group scales with saturating, subnormal and
   tie-producing values, fp8_max 448/240, both unpack modes, hardware and emulated RNE.
4. GEMM, every GPU backend (triton = what select_backend picks on CUDA; scaled_mm) and the
   triton variants (fused gather/reshape, dequant+_scaled_mm), against an fp64 evaluation of
   the spec (X8 @ W8^T * s_x * s_w + bias): M 1/7/64/300/1500, K 576/1000 (not multiples of
   128)/4096, N 384/1000/4096/14336, G 32/64/128/-1, static/dynamic, bias, bf16/fp8 group
   scales, per-tensor/per-channel s_w, 3-D and fp16 inputs. Pass bound: one bf16 ulp of the
   result plus 2**-10 of sum|x8*w8|*s_x*s_w, which covers the FP8 tensor cores' narrower
   accumulation (Hopper keeps about 14 bits inside an MMA) and is far below what a wrong
   nibble, scale or group produces. The stricter CPU-test criterion (tests/test_kernels.py
   ``close``, one bf16 ulp + 1e-5 of the reference) is reported alongside as a fraction.

Then benchmarks/gemm.py (quick form: the protocol's shapes and M, 20 runs) for group 128,
and, time permitting, group 32. Files: gpu_check.json, gemm_g128.json/.png, gemm_g32.json/.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm as gemm_bench  # noqa: E402  (benchmarks/gemm.py)

START = time.time()
RESULTS: list[dict] = []
ULP = 2.0**-7
DEV = torch.device("cuda")
DRY_RUN = False  # --dry-run-cpu: Triton's interpreter on CPU tensors, small cases (tests the harness)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def elapsed() -> float:
    return time.time() - START


def record(name: str, ok: bool | None | str, detail: str = "") -> None:
    status = {True: "PASS", False: "FAIL", None: "SKIP", "warn": "WARN"}[ok]
    RESULTS.append({"check": name, "status": status, "detail": detail})
    print(f"{status} {name}{'  ' + detail if detail else ''}", flush=True)


def guarded(name):
    """Run a check function; an exception is a FAIL with its traceback."""
    def wrap(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:
                traceback.print_exc()
                record(name, False, f"raised {type(e).__name__}: {str(e)[:500]}")
        return run
    return wrap


# ----------------------------------------------------------------------------- 1. cast

@guarded("cast")
def check_cast():
    from vllm_dpq.kernels import triton_w4a8 as tw

    dev = DEV
    # torch's GPU cast against its CPU cast, on a sample (the GPU cast is the exhaustive reference)
    g = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.randn(1 << 20, generator=g) * 100,
                        torch.empty(1 << 20).uniform_(-2**-6, 2**-6, generator=g)])
    same = torch.equal(sample.to(torch.float8_e4m3fn).view(torch.uint8),
                       sample.to(dev).to(torch.float8_e4m3fn).cpu().view(torch.uint8))
    record("cast: torch GPU fp32->e4m3 == torch CPU", same)
    one = torch.ones(1, device=dev)
    kernel = tw._kernels()["act_quant"]
    top = 0x43E00000  # bits of 448.0
    chunk = 1 << 26
    row = 4096
    # emulate: what the activation kernel uses by default (must be exact); hw: the conversion the
    # weight tiles use (informational: the tiles only need it exact on <= 11-bit values, which
    # check 3 verifies bit for bit)
    for emulate in (True, False):
        bad_total, example, t0 = 0, None, time.time()
        for sign in (0, 1):
            for start in range(0, top + 1, chunk):
                end = min(start + ((1 << 16) if DRY_RUN else chunk), top + 1)
                bits = torch.arange(start, end, dtype=torch.int64, device=dev)
                if sign:
                    bits = bits - 2**31  # the int32 whose bits are 0x80000000 | b
                bits = bits.to(torch.int32)
                pad = (-bits.numel()) % row
                if pad:
                    bits = torch.nn.functional.pad(bits, (0, pad))
                x = bits.view(torch.float32).reshape(-1, row)
                xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
                sx = torch.empty(x.shape[0], device=dev)
                kernel[(x.shape[0],)](x, xq, sx, one, row, row, x.stride(0), xq.stride(0), 448.0,
                                      STATIC=True, BLOCK_K=row, EMULATE_RNE=emulate or DRY_RUN, num_warps=8)
                ref = x.to(torch.float8_e4m3fn)
                diff = xq.view(torch.uint8) != ref.view(torch.uint8)
                n_bad = int(diff.sum())
                if n_bad and example is None:
                    i = int(diff.reshape(-1).nonzero()[0])
                    example = (float(x.reshape(-1)[i]), float(xq.reshape(-1)[i].float()),
                               float(ref.reshape(-1)[i].float()))
                bad_total += n_bad
                del bits, x, xq, ref, diff
        eg = "" if example is None else f", e.g. x={example[0]!r} got {example[1]} want {example[2]}"
        detail = f"{bad_total} mismatches{eg} ({time.time() - t0:.1f}s)"
        if emulate:
            record("cast: exhaustive |x|<=448, emulated RNE (activations)", bad_total == 0, detail)
        else:
            record("cast: exhaustive |x|<=448, hardware conversion (weight tiles; informational)",
                   True if bad_total == 0 else "warn", detail)


# ----------------------------------------------------------------------------- 2. activations

@guarded("activation quantization")
def check_act():
    from vllm_dpq.kernels import triton_w4a8 as tw
    from vllm_dpq.numerics import quantize_activation

    dev = DEV
    g = torch.Generator().manual_seed(1)
    for m, k in ((1, 576), (7, 1000)) if DRY_RUN else ((1, 576), (7, 1000), (64, 4096), (300, 14336)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            mag = torch.exp2(torch.empty(m, k).uniform_(-20, 10, generator=g))
            x = (torch.randn(m, k, generator=g) * mag).clamp(-6e4, 6e4)
            if m > 1:
                x[1] = 0
            x = x.to(dtype)
            for static in (None, torch.tensor([0.05]), torch.tensor([1e-4])):
                xq, sx = tw.quantize_activation(x.to(dev), None if static is None else static.to(dev), 448.0)
                rq, rs = quantize_activation(x, static, 448.0)
                ok = torch.equal(xq.cpu().view(torch.uint8), rq.to(torch.float8_e4m3fn).view(torch.uint8))
                ok = ok and torch.equal(sx.cpu(), rs.reshape(-1).expand(m))
                if not ok:
                    record(f"act quant M={m} K={k} {dtype} static={static}", False)
                    return
    record("activation quantization bit-exact", True)


# ----------------------------------------------------------------------------- 3. weight tiles

def synthetic_weights(n, k, group, scale_dtype, fp8_max=448.0, seed=0, device="cpu"):
    from vllm_dpq.kernels.base import W4A8Weights

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    grp = k if group == -1 else group
    groups = -(-k // grp)
    kind = torch.randint(0, 4, (n, groups), generator=g)
    s = torch.exp2(torch.empty(n, groups).uniform_(-12, 3, generator=g))
    s = torch.where(kind == 0, torch.empty(n, groups).uniform_(40, 120, generator=g), s)
    s = torch.where(kind == 1, torch.exp2(torch.empty(n, groups).uniform_(-16, -9, generator=g)), s)
    s = torch.where(kind == 2, 1.0 + torch.randint(0, 16, (n, groups), generator=g) / 16.0, s)
    s = s.to(scale_dtype)
    s = torch.where(s.float() > 0, s.float(), torch.tensor(2.0**-9)).to(scale_dtype)
    packed = gemm_bench._pack_to_int32(q, 4, 1)
    return W4A8Weights(packed.to(device), s.to(device), torch.tensor([0.5], device=device), None, k, grp, fp8_max)


@guarded("weight tiles")
def check_dequant():
    from vllm_dpq.kernels import triton_w4a8 as tw

    n_cases = 0
    shapes = [(512, 576, 32), (1000, 1000, 64), (384, 1000, 128), (384, 576, -1), (512, 1000, 96), (4096, 4096, 128)]
    if DRY_RUN:
        shapes = [(24, 100, 32), (40, 72, -1), (16, 200, 96)]
    for i, (n, k, group) in enumerate(shapes):
        for sdt in (torch.bfloat16, torch.float8_e4m3fn):
            fp8_max = 240.0 if i == 1 and sdt == torch.bfloat16 else 448.0
            w = synthetic_weights(n, k, group, sdt, fp8_max, seed=i)
            ref = w.fp8_values().to(torch.float8_e4m3fn).view(torch.uint8)
            st = tw.prepare_weights(synthetic_weights(n, k, group, sdt, fp8_max, seed=i, device=DEV))
            for mode, unpack, bk in (("hw", "reshape", 64), ("hw", "gather", 128), ("emulate", "reshape", 128)):
                os.environ[tw.ENV_RNE] = mode
                got = tw.dequantize_weight(st, block_k=bk, unpack=unpack).cpu().view(torch.uint8)
                n_cases += 1
                if not torch.equal(got, ref):
                    record(f"weight tiles N={n} K={k} G={group} {sdt} max={fp8_max} {unpack} bk={bk} RNE {mode}",
                           False, f"{int((got != ref).sum())} of {ref.numel()} bytes differ")
                    os.environ.pop(tw.ENV_RNE, None)
                    return
            os.environ.pop(tw.ENV_RNE, None)
    record(f"weight tiles bit-exact ({n_cases} cases)", True)


# ----------------------------------------------------------------------------- 4. GEMM

def spec_check(y, x, w_cpu, bias):
    """y (any device) vs the spec in fp64. Returns (ok, strict_fraction, worst normalised error)."""
    from vllm_dpq.numerics import quantize_activation, w4a8_matmul

    x2 = x.reshape(-1, x.shape[-1]).cpu()
    x8, s_x = quantize_activation(x2, w_cpu.input_scale, w_cpu.fp8_max)
    w8 = w_cpu.fp8_values()
    s_w = w_cpu.weight_scale.float().reshape(1, -1)
    scale = (s_x * s_w).double()
    exact = (x8.double() @ w8.double().t()) * scale
    mag = (x8.abs().double() @ w8.abs().double().t()) * scale
    if bias is not None:
        exact = exact + bias.double().cpu()
    yy = y.reshape(exact.shape).double().cpu()
    gemm_part = exact - (bias.double().cpu() if bias is not None else 0)
    allow = ULP * (exact.abs() + gemm_part.abs()) + 2.0**-10 * mag + 1e-6
    ok = bool(((yy - exact).abs() <= allow).all())
    ref = w4a8_matmul(x2, w8, w_cpu.weight_scale, w_cpu.fp8_max, w_cpu.input_scale, bias,
                      out_dtype=y.dtype).double()
    ref_gemm = ref - (bias.double().cpu() if bias is not None else 0)
    strict = ((yy - ref).abs() <= ULP * (ref.abs() + ref_gemm.abs()) + 1e-5).double().mean().item()
    # error beyond the result's own bf16 rounding, relative to sum|x8*w8| (0 when the GEMM is exact)
    excess = ((yy - exact).abs() - ULP * (exact.abs() + gemm_part.abs())).clamp(min=0)
    worst = (excess / (mag + 1e-30)).max().item()
    return ok, strict, worst


def gemm_cases():
    if DRY_RUN:
        yield dict(m=5, n=40, k=100, g=32, sdt="bfloat16", static=False, channel=True, bias=True, extra=True)
        yield dict(m=300, n=24, k=576, g=-1, sdt="float8_e4m3fn", static=True, channel=False, bias=False, extra=False)
        yield dict(m=1, n=24, k=72, g=64, sdt="float8_e4m3fn", static=False, channel=False, bias=False, extra=True)
        return
    i = 0
    for k, group, m in itertools.product((576, 1000), (32, 64, 128, -1), (1, 7, 64, 300)):
        yield dict(m=m, n=(384, 1000)[(i // 4) % 2], k=k, g=group,
                   sdt=("bfloat16", "float8_e4m3fn")[(i // 2) % 2], static=(i // 3) % 2 == 1, channel=i % 3 == 0,
                   bias=i % 2 == 0, extra=i % 4 == 1)
        i += 1
    yield dict(m=1500, n=1000, k=1000, g=128, sdt="bfloat16", static=False, channel=False, bias=True, extra=False)
    yield dict(m=1500, n=384, k=576, g=32, sdt="float8_e4m3fn", static=True, channel=True, bias=False, extra=False)
    yield dict(m=64, n=4096, k=4096, g=128, sdt="bfloat16", static=False, channel=False, bias=False, extra=True)
    yield dict(m=1, n=14336, k=4096, g=32, sdt="bfloat16", static=False, channel=False, bias=True, extra=False)
    yield dict(m=300, n=4096, k=14336 // 2, g=64, sdt="float8_e4m3fn", static=True, channel=True, bias=True,
               extra=False)


def check_gemm(budget_s: float):
    from vllm_dpq.kernels import BACKENDS, select_backend
    from vllm_dpq.kernels import triton_w4a8 as tw
    from vllm_dpq.kernels.base import W4A8Weights
    from vllm_dpq.numerics import Scheme, quantize_rtn

    dev = DEV
    n_pass = n_fail = n_skip = 0
    worst_all, strict_min = 0.0, 1.0
    for ci, c in enumerate(gemm_cases()):
        label = (f"gemm M={c['m']} N={c['n']} K={c['k']} G={c['g']} {c['sdt']} "
                 f"{'static' if c['static'] else 'dynamic'} {'per-channel' if c['channel'] else 'per-tensor'} s_w"
                 f"{' bias' if c['bias'] else ''}")
        if elapsed() > budget_s:
            record(label, None, "time budget spent")
            n_skip += 1
            continue
        try:
            scheme = Scheme(group_size=c["g"], group_scale_dtype=c["sdt"],
                            weight_scale="channel" if c["channel"] else "tensor")
            g = torch.Generator().manual_seed(ci)
            w = torch.randn(c["n"], c["k"], generator=g) * 0.05
            qw = quantize_rtn(w, scheme)
            x = (torch.randn(c["m"], c["k"], generator=g) * 2).to(torch.bfloat16)
            if c["m"] > 1:
                x[1] = 0
            s_in = torch.tensor([x.float().abs().max().item() / scheme.fp8_max]) if c["static"] else None
            bias = torch.randn(c["n"], generator=g).to(torch.bfloat16) if c["bias"] else None
            packed = gemm_bench._pack_to_int32(qw.q, 4, 1)
            w_cpu = W4A8Weights(packed, qw.group_scale, qw.weight_scale, s_in, c["k"], qw.group_size, scheme.fp8_max)
            w_gpu = W4A8Weights(packed.to(dev), qw.group_scale.to(dev), qw.weight_scale.to(dev),
                                None if s_in is None else s_in.to(dev), c["k"], qw.group_size, scheme.fp8_max)
            chosen = tw.TritonBackend() if DRY_RUN else select_backend(w_gpu, dev)
            xg, bg = x.to(dev), None if bias is None else bias.to(dev)
            runs = {f"{chosen.name} (selected)": lambda: chosen.apply(chosen.prepare(w_gpu), xg, bg)}
            if chosen.name != "scaled_mm":
                sm = BACKENDS["scaled_mm"]
                runs["scaled_mm"] = lambda: sm.apply(sm.prepare(w_gpu), xg, bg)
            if c["extra"]:
                st = tw.prepare_weights(w_gpu)
                cfg = tw.pick_config(c["m"], c["n"], c["k"], tw._sms(dev))
                runs["triton fused gather"] = lambda: tw.linear(
                    st, xg, bg, config=tw.TritonConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k,
                                                      cfg.num_warps, cfg.num_stages, unpack="gather"))
                runs["triton dequant"] = lambda: tw.linear(st, xg, bg, path="dequant")
                runs["triton fused 3-D"] = lambda: tw.linear(st, xg.reshape(c["m"], 1, c["k"]), bg, path="fused")
                runs["triton fused fp16"] = lambda: tw.linear(st, xg.half(), bg, path="fused")
                runs["triton fused no split-K"] = lambda: tw.linear(
                    st, xg, bg, config=tw.TritonConfig(cfg.block_m, cfg.block_n, cfg.block_k, 1, cfg.num_warps,
                                                      cfg.num_stages))
            if c["m"] == 300 and c["k"] == 576:
                os.environ[tw.ENV_RNE] = "emulate"
                st2 = tw.prepare_weights(w_gpu)
                y_emul = tw.linear(st2, xg, bg, path="fused")
                os.environ.pop(tw.ENV_RNE, None)
                runs["triton fused RNE emulate"] = lambda: y_emul
            for name, fn in runs.items():
                y = fn()
                sync()
                xin = x.half() if "fp16" in name else x
                want_dtype = torch.float16 if "fp16" in name else torch.bfloat16
                want_shape = (c["m"], 1, c["n"]) if "3-D" in name else (c["m"], c["n"])
                if tuple(y.shape) != want_shape or y.dtype != want_dtype:
                    record(f"{label} [{name}]", False, f"shape/dtype {tuple(y.shape)} {y.dtype}")
                    n_fail += 1
                    continue
                ok, strict, worst = spec_check(y, xin, w_cpu, bias)
                worst_all, strict_min = max(worst_all, worst), min(strict_min, strict)
                record(f"{label} [{name}]", ok, f"strict-close {strict:.4f}, excess err/sum|x8 w8| {worst:.1e}")
                n_pass += ok
                n_fail += not ok
        except Exception as e:
            traceback.print_exc()
            record(label, False, f"raised {type(e).__name__}: {str(e)[:500]}")
            n_fail += 1
    print(f"GEMM: {n_pass} pass, {n_fail} fail, {n_skip} skipped; worst error beyond bf16 rounding / sum|x8*w8| = "
          f"{worst_all:.1e} (bound 9.8e-04); "
          f"lowest strict-close fraction {strict_min:.4f}", flush=True)


# ----------------------------------------------------------------------------- main

def header() -> dict:
    info = gemm_bench.versions()
    print("=" * 78)
    print(f"GPU: {info.get('gpu', 'none')}  capability {info.get('capability')}  SMs {info.get('sms')}  "
          f"memory {info.get('memory_gib')} GiB")
    print(f"torch {info['torch']} (CUDA {info['cuda']})  triton {info['triton']}  python {platform.python_version()}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        print(f"nvidia-smi: {smi}")
        info["nvidia_smi"] = smi
    except Exception:
        pass
    print("=" * 78, flush=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or "results"))
    ap.add_argument("--check-budget-s", type=float, default=300, help="stop starting GEMM checks after this")
    ap.add_argument("--total-budget-s", type=float, default=450, help="skip the group-32 benchmark after this")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-cast", action="store_true")
    ap.add_argument("--full-bench", action="store_true", help="all benchmark backends, 25 runs")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: run the checks' harness on CPU under TRITON_INTERPRET=1, small cases, no benchmark")
    args = ap.parse_args(argv)
    info = header()
    global DEV, DRY_RUN
    if args.dry_run_cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run-cpu needs TRITON_INTERPRET=1")
            return 2
        DEV, DRY_RUN, args.skip_bench = torch.device("cpu"), True, True
    elif not torch.cuda.is_available():
        print("FAIL no CUDA device: torch.cuda.is_available() is False; nothing checked.")
        return 2
    stub = gemm_bench.install_packing_fallback()
    print(f"compressed-tensors: {'absent, using the fallback packer' if stub else 'present'}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from vllm_dpq.kernels import select_backend  # noqa: F401  (import check)
    from vllm_dpq.kernels.triton_w4a8 import TritonBackend, triton_import_error

    if triton_import_error():
        record("triton import", False, triton_import_error())
    if not args.skip_cast:
        check_cast()
    check_act()
    check_dequant()
    check_gemm(args.check_budget_s)
    fails = [r for r in RESULTS if r["status"] == "FAIL"]
    summary = (f"SUMMARY: {sum(r['status'] == 'PASS' for r in RESULTS)} passed, {len(fails)} failed, "
               f"{sum(r['status'] == 'SKIP' for r in RESULTS)} skipped, {sum(r['status'] == 'WARN' for r in RESULTS)} "
               f"warnings in {elapsed():.0f}s")
    print(summary, flush=True)
    for r in fails:
        print(f"  FAILED: {r['check']}  {r['detail']}")
    report = {"info": info, "summary": summary, "checks": RESULTS, "triton_unsupported_reason":
              TritonBackend().unsupported(synthetic_weights(16, 64, 32, torch.bfloat16, device=DEV), DEV)}
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if not args.skip_bench:
        for group in (128, 32):
            if group != 128 and elapsed() > args.total_budget_s:
                print(f"benchmark group {group} skipped: {elapsed():.0f}s elapsed", flush=True)
                continue
            backends = (gemm_bench.BACKENDS if args.full_bench else
                        ["bf16", "fp8_w8a8", "dpq_triton", "dpq_triton_fused", "dpq_triton_dequant", "dpq_scaled_mm"])
            if group != 128:
                backends = ["bf16", "fp8_w8a8", "dpq_triton", "dpq_triton_fused"]
            try:
                gemm_bench.run(args.out_dir / f"gemm_g{group}.json", backends=backends,
                               iters=25 if args.full_bench else 20, group=group)
            except Exception as e:
                traceback.print_exc()
                print(f"benchmark group {group} raised {type(e).__name__}: {e}", flush=True)
    print(summary)
    print(f"done in {elapsed():.0f}s; files in {args.out_dir}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
