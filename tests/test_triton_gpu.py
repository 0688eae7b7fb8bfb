"""GPU checks of the W4A8 kernel backends: pytest cases marked ``gpu``, skipped without a
CUDA device. Needs torch, Triton and pytest only (no vLLM, no compressed-tensors, no network);
benchmarks/gpu_check.sh runs them before the GEMM benchmark:

    PYTHONPATH=. python -m pytest -m gpu tests/test_triton_gpu.py

Dry run without a GPU, on CPU under Triton's interpreter (small shapes; checks the harness,
not the hardware; about a minute):

    TRITON_INTERPRET=1 DPQ_GPU_DRY_RUN=1 PYTHONPATH=. python -m pytest -m gpu tests/test_triton_gpu.py

The case generators and pass criteria are the CPU tests' (tests/kernel_cases.py), at GPU sizes:

1. fp32 -> e4m3 rounding, exhaustive: every fp32 value with |x| <= 448 (2.3e9 values) through
   the activation kernel with a static scale of 1 (x / 1 is exact), bit for bit against
   torch's cast on the GPU (itself checked against torch's CPU cast on a sample): the emulated
   RNE that activations use (must be exact), and the hardware conversion that the weight tiles
   use (a warning, not a failure, if inexact: the tiles only need it exact on <= 11-bit values,
   which check 3 proves).
2. Activation quantization bit for bit against numerics.quantize_activation (CPU):
   bf16/fp16/fp32, dynamic and static (including saturating static scales), zero rows.
3. Dequantized weight tiles bit for bit against W4A8Weights.fp8_values() (CPU): group sizes
   32/64/128/96/per-channel, ragged K, bf16/fp8 group scales with saturating, subnormal and
   tie-producing values, fp8_max 448/240, both unpack modes, hardware and emulated RNE.
4. GEMM, every GPU backend (the one select_backend picks on CUDA, triton on SM89+; scaled_mm)
   and the triton variants (fused gather/reshape, no split-K, dequant + _scaled_mm, 3-D and
   fp16 inputs, emulated RNE), against an fp64 evaluation of the spec (``spec_check``: one
   bf16 ulp of the result plus 2**-10 of sum|x8*w8|*s_x*s_w): M 1/7/64/300/1500, K 576/1000
   (not multiples of 128)/4096/7168, N 384/1000/4096/14336, G 32/64/128/-1, static/dynamic,
   bias, bf16/fp8 group scales, per-tensor/per-channel s_w. Each case records (junit
   properties) the fraction of outputs within the stricter CPU criterion and its worst error.
   $DPQ_GPU_GEMM_BUDGET_S: GEMM cases not started within that many seconds of this
   module's import are skipped ("time budget spent").
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import replace

import pytest
import torch

from kernel_cases import (  # tests/kernel_cases.py: shared with the CPU tests
    ACT_DTYPES,
    ACT_SHAPES_GPU,
    ACT_SHAPES_SMALL,
    ACT_STATIC_SCALES,
    GEMM_CASES_DRY,
    SCALE_DTYPES,
    TILE_SHAPES_GPU,
    TILE_SHAPES_SMALL,
    activation_input,
    activation_mismatch,
    gemm_cases_gpu,
    make,
    spec_check,
    spec_reference,
    synthetic_weights,
    tile_mismatches,
    to_device,
)
from vllm_dpq.kernels.triton.config import ENV_RNE, interpreting

ENV_DRY_RUN = "DPQ_GPU_DRY_RUN"
ENV_BUDGET = "DPQ_GPU_GEMM_BUDGET_S"
START = time.time()

CUDA = torch.cuda.is_available()
DRY = not CUDA and os.environ.get(ENV_DRY_RUN) == "1"
DEV = torch.device("cuda" if CUDA else "cpu")


def _skip_reason() -> str | None:
    if CUDA:
        return None
    if DRY:
        return None if interpreting() else f"{ENV_DRY_RUN}=1 needs TRITON_INTERPRET=1 (Triton's CPU interpreter)"
    return (f"no CUDA device (torch.cuda.is_available() is False); {ENV_DRY_RUN}=1 with TRITON_INTERPRET=1 "
            "runs small cases on CPU")


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
gpu_only = pytest.mark.skipif(DRY, reason="dry run: meaningful on a GPU only")


def _tw():
    from vllm_dpq.kernels import triton as tw

    return tw


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- environment

def test_triton_importable():
    from vllm_dpq.kernels.triton import triton_import_error

    assert triton_import_error() is None


@gpu_only
def test_triton_selected_on_fp8_gpus(record_property):
    from vllm_dpq.kernels import select_backend

    w = to_device(synthetic_weights(16, 64, 32, torch.bfloat16), DEV)
    reason = _tw().TritonBackend().unsupported(w, DEV)
    cap = torch.cuda.get_device_capability(DEV)
    record_property("capability", f"{cap[0]}.{cap[1]}")
    record_property("triton_unsupported_reason", str(reason))
    if cap >= _tw().MIN_CAPABILITY:
        assert reason is None and select_backend(w, DEV).name == "triton"
    else:
        assert "compute capability" in reason


# ----------------------------------------------------------------------------- 1. fp32 -> e4m3

@gpu_only
def test_torch_cast_gpu_matches_cpu():
    """torch's GPU fp32 -> e4m3 cast (the exhaustive check's reference) against its CPU cast."""
    g = torch.Generator().manual_seed(0)
    sample = torch.cat([torch.randn(1 << 20, generator=g) * 100,
                        torch.empty(1 << 20).uniform_(-2**-6, 2**-6, generator=g)])
    assert torch.equal(sample.to(torch.float8_e4m3fn).view(torch.uint8),
                       sample.to(DEV).to(torch.float8_e4m3fn).cpu().view(torch.uint8))


@pytest.mark.parametrize("conversion", ["emulated", "hardware"])
def test_fp32_to_e4m3_exhaustive(conversion, record_property):
    """Every fp32 |x| <= 448 (dry run: 4096 values from each 2**26) through the activation
    kernel, static scale 1. Emulated (activations): exact. Hardware (weight tiles): recorded,
    a warning if inexact."""
    if DRY and conversion == "hardware":
        pytest.skip("dry run: the interpreter's own fp32 -> fp8 conversion is known to be wrong")
    kernel = _tw().kernels().act_quant_kernel
    one = torch.ones(1, device=DEV)
    top, chunk, row = 0x43E00000, 1 << 26, 4096  # 0x43E00000: the bits of 448.0
    span = row if DRY else chunk
    bad_total, checked, example, t0 = 0, 0, None, time.time()
    for sign in (0, 1):
        for start in range(0, top + 1, chunk):
            bits = torch.arange(start, min(start + span, top + 1), dtype=torch.int64, device=DEV)
            if sign:
                bits = bits - 2**31  # the int32 whose bits are 0x80000000 | b
            bits = bits.to(torch.int32)
            bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % row))
            x = bits.view(torch.float32).reshape(-1, row)
            xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEV)
            sx = torch.empty(x.shape[0], device=DEV)
            kernel[(x.shape[0],)](x, xq, sx, one, row, row, x.stride(0), xq.stride(0), 448.0,
                                  STATIC=True, BLOCK_K=row, EMULATE_RNE=conversion == "emulated", num_warps=8)
            ref = x.to(torch.float8_e4m3fn)
            diff = xq.view(torch.uint8) != ref.view(torch.uint8)
            n_bad = int(diff.sum())
            if n_bad and example is None:
                i = int(diff.reshape(-1).nonzero()[0])
                example = (float(x.reshape(-1)[i]), float(xq.reshape(-1)[i].float()), float(ref.reshape(-1)[i].float()))
            bad_total += n_bad
            checked += x.numel()
            del bits, x, xq, ref, diff
    eg = "" if example is None else f", e.g. x={example[0]!r} got {example[1]} want {example[2]}"
    detail = f"{conversion}: {bad_total} of {checked} mismatches{eg} ({time.time() - t0:.1f}s)"
    record_property("cast", detail)
    print(detail)
    if conversion == "emulated":
        assert bad_total == 0, detail
    elif bad_total:
        warnings.warn(f"hardware fp32 -> e4m3 conversion is not RNE everywhere ({detail}); the weight tiles "
                      "only need it on <= 11-bit values (test_weight_tiles_bit_exact)")


# ----------------------------------------------------------------------------- 2. activations

@pytest.mark.parametrize("static", ACT_STATIC_SCALES, ids=lambda s: "dynamic" if s is None else f"static{s:g}")
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("m,k", ACT_SHAPES_SMALL if DRY else ACT_SHAPES_GPU)
def test_activation_quantization_bit_exact(m, k, dtype, static):
    x = activation_input(m, k, dtype, torch.Generator().manual_seed(m * 100003 + k))
    s_in = None if static is None else torch.tensor([static])
    xq, sx = _tw().quantize_activation_fp8(x.to(DEV), None if s_in is None else s_in.to(DEV), 448.0)
    _sync()
    err = activation_mismatch(xq, sx, x, s_in, 448.0)
    assert err is None, err


# ----------------------------------------------------------------------------- 3. weight tiles

TILE_SHAPES = TILE_SHAPES_SMALL if DRY else TILE_SHAPES_GPU


@pytest.mark.parametrize("rne,unpack,block_k", [("hw", "reshape", 64), ("hw", "gather", 128),
                                                 ("emulate", "reshape", 128)], ids=lambda v: str(v))
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "N{}-K{}-G{}".format(*s))
def test_weight_tiles_bit_exact(shape, scale_dtype, rne, unpack, block_k, monkeypatch):
    i = TILE_SHAPES.index(shape)
    n, k, group = shape
    fp8_max = 240.0 if i == 1 and scale_dtype == torch.bfloat16 else 448.0
    w = synthetic_weights(n, k, group, scale_dtype, fp8_max, seed=i)
    monkeypatch.setenv(ENV_RNE, rne)  # read by prepare
    state = _tw().prepare_weights(to_device(w, DEV))
    got = _tw().dequantize_weight(state, block_k=block_k, unpack=unpack)
    bad = tile_mismatches(got, w)
    assert bad == 0, f"{bad} of {n * k} bytes differ (fp8_max {fp8_max})"


# ----------------------------------------------------------------------------- 4. GEMM

GEMM_CASES = GEMM_CASES_DRY if DRY else gemm_cases_gpu()
TRITON_VARIANTS = ("fused-gather", "dequant", "fused-3d", "fused-fp16", "fused-no-splitk")


def _variants(c: dict) -> list[str]:
    out = ["selected", "scaled_mm"] + (list(TRITON_VARIANTS) if c["extra"] else [])
    return out + (["fused-rne-emulate"] if (c["m"], c["k"]) == (300, 576) else [])


def _case_id(c: dict) -> str:
    return (f"M{c['m']}-N{c['n']}-K{c['k']}-G{c['g']}-{'bf16' if c['sdt'] == SCALE_DTYPES[0] else 'fp8'}"
            f"-{'static' if c['static'] else 'dynamic'}-{'channel' if c['channel'] else 'tensor'}"
            f"{'-bias' if c['bias'] else ''}")


@functools.lru_cache(maxsize=2)
def _layer(i: int):
    """(CPU weights, x bf16 [M, K], bias or None, weights on DEV) of GEMM case i."""
    from vllm_dpq.numerics import Scheme

    c = GEMM_CASES[i]
    scheme = Scheme(group_size=c["g"], group_scale_dtype=c["sdt"], weight_scale="channel" if c["channel"] else "tensor")
    _, x, _, bias, w = make(c["n"], c["k"], scheme, c["static"], seed=i, m=c["m"])
    return w, x, bias if c["bias"] else None, to_device(w, DEV)


@functools.lru_cache(maxsize=2)
def _reference(i: int, fp16: bool):
    w, x, bias, _ = _layer(i)
    return spec_reference(x.half() if fp16 else x, w, bias, torch.float16 if fp16 else torch.bfloat16)


def _run(c: dict, variant: str, w_dev, x, bias, monkeypatch, record_property):
    from vllm_dpq.kernels import BACKENDS, select_backend

    tw = _tw()
    if variant == "selected":
        backend = tw.TritonBackend() if DRY else select_backend(w_dev, DEV)
        record_property("backend", backend.name)
        return backend.apply(backend.prepare(w_dev), x, bias)
    if variant == "scaled_mm":
        if not DRY and select_backend(w_dev, DEV).name == "scaled_mm":
            pytest.skip("scaled_mm is the selected backend here: covered by [selected]")
        return BACKENDS["scaled_mm"].apply(BACKENDS["scaled_mm"].prepare(w_dev), x, bias)
    if variant == "fused-rne-emulate":
        monkeypatch.setenv(ENV_RNE, "emulate")  # read by prepare
    state = tw.prepare_weights(w_dev)
    cfg = tw.pick_config(c["m"], c["n"], c["k"], tw.num_sms(DEV))
    if variant == "fused-gather":
        return tw.linear(state, x, bias, config=replace(cfg, unpack="gather"))
    if variant == "fused-no-splitk":
        return tw.linear(state, x, bias, config=replace(cfg, split_k=1))
    if variant == "dequant":
        return tw.linear(state, x, bias, path="dequant")
    if variant == "fused-3d":
        return tw.linear(state, x.reshape(c["m"], 1, c["k"]), bias, path="fused")
    if variant == "fused-fp16":
        return tw.linear(state, x.half(), bias, path="fused")
    return tw.linear(state, x, bias, path="fused")


@pytest.mark.parametrize("case,variant", [pytest.param(i, v, id=f"{_case_id(c)}-{v}")
                                          for i, c in enumerate(GEMM_CASES) for v in _variants(c)])
def test_gemm_matches_spec(case, variant, monkeypatch, record_property):
    budget = float(os.environ.get(ENV_BUDGET, "inf"))
    if time.time() - START > budget:
        pytest.skip(f"time budget spent ({ENV_BUDGET}={budget:g})")
    c = GEMM_CASES[case]
    w, x, bias, w_dev = _layer(case)
    y = _run(c, variant, w_dev, x.to(DEV), None if bias is None else bias.to(DEV), monkeypatch, record_property)
    _sync()
    fp16 = variant == "fused-fp16"
    want_shape = (c["m"], 1, c["n"]) if variant == "fused-3d" else (c["m"], c["n"])
    assert tuple(y.shape) == want_shape and y.dtype == (torch.float16 if fp16 else torch.bfloat16)
    ok, strict, worst = spec_check(y, _reference(case, fp16))
    record_property("strict_close_fraction", round(strict, 6))
    record_property("excess_error_over_sum_abs", f"{worst:.2e}")
    assert ok, f"beyond the spec bound: strict-close {strict:.4f}, excess err / sum|x8 w8| {worst:.1e} (bound 9.8e-04)"
