"""Case generators and pass criteria shared by the kernel tests: tests/test_kernels.py (every
backend on CPU), tests/test_triton_kernel.py (the Triton kernels under Triton's CPU
interpreter, small shapes) and tests/test_triton_gpu.py (``pytest -m gpu``: the same checks on
a GPU, real shapes). Imports torch and vllm_dpq only: no vLLM, no compressed-tensors, no
triton, so the GPU machines (torch + Triton only) can import it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from vllm_dpq.kernels.base import W4A8Weights
from calibration.algorithms import quantize_rtn
from vllm_dpq.numerics import FP8_DTYPE, quantize_activation, w4a8_matmul
from vllm_dpq.packing import pack_int4

ULP = 2.0**-7  # one bf16 ulp, relative: backends round the fp32 GEMM result to bf16 once more
SCALE_DTYPES = ("bfloat16", "float8_e4m3fn")  # group-scale dtypes (Scheme.group_scale_dtype)
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# static activation scales: None = dynamic per token; the small ones saturate most of a row
ACT_STATIC_SCALES = (None, 0.05, 3e-3, 1e-4)
UNPACK_MODES = ("gather", "reshape")

# Shapes: SMALL for Triton's CPU interpreter (and the GPU tests' dry run on CPU), GPU for a GPU.
ACT_SHAPES_SMALL = [(6, 300)]  # (M, K)
ACT_SHAPES_GPU = [(1, 576), (7, 1000), (64, 4096), (300, 14336)]
# (N, K, group): ragged last groups, group % BLOCK_K == 0, per channel (-1, or group == K)
TILE_SHAPES_SMALL = [(24, 72, 32), (40, 100, 64), (40, 256, 128), (24, 100, -1), (16, 200, 64), (24, 96, 96)]
TILE_SHAPES_GPU = [(512, 576, 32), (1000, 1000, 64), (384, 1000, 128), (384, 576, -1), (512, 1000, 96),
                   (4096, 4096, 128)]


# ----------------------------------------------------------------------------- layers

def make(n, k, scheme, static, seed=0, m=7, dtype=torch.bfloat16):
    """(quantized weight, x [m, K] with a zero row, static s_x or None, bias, W4A8Weights),
    an RTN-quantized random layer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    if m > 1:
        x[1] = 0
    qw = quantize_rtn(w, scheme)
    s_x = torch.tensor([x.float().abs().max().item() / scheme.fp8_max]) if static else None
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    weights = W4A8Weights(pack_int4(qw.q), qw.group_scale, qw.weight_scale, s_x, k, qw.group_size, scheme.fp8_max)
    return qw, x, s_x, bias, weights


def to_device(w: W4A8Weights, device) -> W4A8Weights:
    """The same layer with every tensor on ``device``."""
    return W4A8Weights(w.packed.to(device), w.group_scale.to(device), w.weight_scale.to(device),
                       None if w.input_scale is None else w.input_scale.to(device), w.k, w.group_size, w.fp8_max)


def synthetic_weights(n, k, group, scale_dtype, fp8_max=448.0, seed=0):
    """Random codes and deliberately awkward group scales: some saturate (8 * s_g > fp8_max),
    some give FP8 subnormals, some hit rounding ties. group -1 (or >= k): per channel."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    group = k if group == -1 else group
    groups = -(-k // group)
    kind = torch.randint(0, 4, (n, groups), generator=g)
    s = torch.exp2(torch.empty(n, groups).uniform_(-12, 3, generator=g))
    s = torch.where(kind == 0, torch.empty(n, groups).uniform_(40, 120, generator=g), s)  # saturating
    s = torch.where(kind == 1, torch.exp2(torch.empty(n, groups).uniform_(-16, -9, generator=g)), s)  # subnormal
    s = torch.where(kind == 2, 1.0 + torch.randint(0, 16, (n, groups), generator=g) / 16.0, s)  # ties
    s = s.to(scale_dtype)
    s = torch.where(s.float() > 0, s.float(), torch.tensor(2.0**-9)).to(scale_dtype)
    return W4A8Weights(pack_int4(q), s, torch.tensor([0.5]), None, k, group, fp8_max)


def activation_input(m, k, dtype, generator):
    """x [m, K] spanning 2**-20..2**10 in magnitude, a zero row (1), a row (2) whose head
    becomes e4m3 subnormals after scaling."""
    mag = torch.exp2(torch.empty(m, k).uniform_(-20, 10, generator=generator))
    x = torch.randn(m, k, generator=generator) * mag
    if m > 1:
        x[1] = 0
    if m > 2:
        x[2, :7] = 1e-8
    return x.clamp(-6e4, 6e4).to(dtype)


def cast_probe_values() -> torch.Tensor:
    """fp32 values for a fp32 -> e4m3 rounding check: every e4m3 value, every midpoint and its
    fp32 neighbours, random values over the whole range and the subnormals, out-of-range ones."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique().sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    g = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(4000, generator=g) * 100,
                      torch.exp2(torch.empty(4000).uniform_(-14, 9, generator=g))
                      * torch.randn(4000, generator=g).sign(),
                      torch.empty(2000).uniform_(-2**-6, 2**-6, generator=g)])
    return torch.cat([grid, mids, mids.nextafter(up), mids.nextafter(down), rand, torch.tensor([460.0, -1e6, 1e-30])])


def covering_design(product: dict, rotating: dict) -> list[dict]:
    """Every combination of the ``product`` axes (the first varies slowest); each ``rotating``
    axis name -> (values, stride) takes values[(i // stride) % len(values)] in case i."""
    cases = []
    for i, combo in enumerate(itertools.product(*product.values())):
        case = dict(zip(product, combo))
        case.update({name: values[(i // stride) % len(values)] for name, (values, stride) in rotating.items()})
        cases.append(case)
    return cases


def gemm_cases_small() -> list[dict]:
    """Interpreter GEMM cases: a covering design over N x K x G with M, the group-scale dtype,
    static/dynamic activations, per-tensor/per-channel s_w and the kernel config rotating
    (config None = the table, split-K for small M here)."""
    from vllm_dpq.kernels.triton.config import TritonConfig

    configs = (None, TritonConfig(16, 16, 32, unpack="gather"), TritonConfig(16, 32, 64, split_k=2),
               TritonConfig(16, 64, 128, split_k=4, unpack="gather"), TritonConfig(32, 16, 64, group_m=2))
    return covering_design(dict(n=(24, 40), k=(72, 100, 256), g=(32, 64, -1)),
                           dict(m=((1, 5), 1), sdt=(SCALE_DTYPES, 2), static=((False, True), 4),
                                channel=((True, False, False), 1), config=(configs, 1)))


def gemm_cases_gpu() -> list[dict]:
    """GPU GEMM cases: K 576/1000 (not multiples of 128) x G 32/64/128/per-channel x M
    1/7/64/300 with N, the group-scale dtype, static/dynamic, s_w kind, bias and the extra
    triton variants ("extra") rotating; then large M, Llama-sized N/K."""
    cases = covering_design(dict(k=(576, 1000), g=(32, 64, 128, -1), m=(1, 7, 64, 300)),
                            dict(n=((384, 1000), 4), sdt=(SCALE_DTYPES, 2), static=((False, True), 3),
                                 channel=((True, False, False), 1), bias=((True, False), 1),
                                 extra=((False, True, False, False), 1)))
    bf16, fp8 = SCALE_DTYPES
    return cases + [
        dict(m=1500, n=1000, k=1000, g=128, sdt=bf16, static=False, channel=False, bias=True, extra=False),
        dict(m=1500, n=384, k=576, g=32, sdt=fp8, static=True, channel=True, bias=False, extra=False),
        dict(m=64, n=4096, k=4096, g=128, sdt=bf16, static=False, channel=False, bias=False, extra=True),
        dict(m=1, n=14336, k=4096, g=32, sdt=bf16, static=False, channel=False, bias=True, extra=False),
        dict(m=300, n=4096, k=7168, g=64, sdt=fp8, static=True, channel=True, bias=True, extra=False),
    ]


# the GPU tests' dry run under the interpreter: a few small cases with every variant
GEMM_CASES_DRY = [
    dict(m=5, n=40, k=100, g=32, sdt="bfloat16", static=False, channel=True, bias=True, extra=True),
    dict(m=300, n=24, k=576, g=-1, sdt="float8_e4m3fn", static=True, channel=False, bias=False, extra=False),
    dict(m=1, n=24, k=72, g=64, sdt="float8_e4m3fn", static=False, channel=False, bias=False, extra=True),
]


# ----------------------------------------------------------------------------- pass criteria

def close(y, ref, bias=None):
    """Within one bf16 ulp of the GEMM result (the bias is added after that rounding)."""
    y, ref = y.float(), ref.float()
    gemm = ref - (bias.float() if bias is not None else 0)
    return bool(((y - ref).abs() <= ULP * (ref.abs() + gemm.abs()) + 1e-5).all())


def activation_mismatch(xq, sx, x, input_scale, fp8_max) -> str | None:
    """Triton's (X8 fp8 [M, >= K], s_x [M]) bit for bit against numerics.quantize_activation on
    CPU (padding columns must be +0); None if equal, else what differs."""
    m, k = x.shape
    rq, rs = quantize_activation(x.cpu(), None if input_scale is None else input_scale.cpu(), fp8_max)
    xq, sx = xq.cpu(), sx.cpu()
    bad = int((xq[:, :k].view(torch.uint8) != rq.to(FP8_DTYPE).view(torch.uint8)).sum())
    if bad:
        return f"{bad} of {m * k} X8 bytes differ"
    if xq.shape[1] > k and bool((xq[:, k:].view(torch.uint8) != 0).any()):
        return "padding columns are not +0"
    if not torch.equal(sx, rs.reshape(-1).expand(m)):
        return f"s_x differs: {sx[:4].tolist()} vs {rs.reshape(-1)[:4].tolist()}"
    return None


def tile_mismatches(w8: torch.Tensor, w: W4A8Weights) -> int:
    """Bytes of a dequantized FP8 weight [N, K] that differ from W4A8Weights.fp8_values()."""
    ref = w.fp8_values().cpu().to(FP8_DTYPE).view(torch.uint8)
    return int((w8.cpu().view(torch.uint8) != ref).sum())


SPEC_MAG_BOUND = 2.0**-10


@dataclass
class SpecReference:
    """An fp64 evaluation of DPQ spec section 1 for one layer and input (``spec_reference``)."""

    gemm: torch.Tensor  # X8 @ W8^T * s_x * s_w, fp64 [M, N]
    exact: torch.Tensor  # gemm + bias
    magnitude: torch.Tensor  # sum|x8*w8| * s_x * s_w
    strict: torch.Tensor  # numerics.w4a8_matmul in the output dtype, as fp64 (the CPU criterion)
    strict_gemm: torch.Tensor  # the same without the bias


def spec_reference(x, w: W4A8Weights, bias=None, out_dtype=torch.bfloat16) -> SpecReference:
    """The reference for ``spec_check``, from the CPU reference's X8 and W8 (x any shape [..., K])."""
    w = to_device(w, "cpu")
    x2 = x.reshape(-1, x.shape[-1]).cpu()
    x8, s_x = quantize_activation(x2, w.input_scale, w.fp8_max)
    w8 = w.fp8_values()
    scale = (s_x * w.weight_scale.float().reshape(1, -1)).double()
    gemm = (x8.double() @ w8.double().t()) * scale
    bias = None if bias is None else bias.cpu()
    bias64 = bias.double() if bias is not None else 0
    strict = w4a8_matmul(x2, w8, w.weight_scale, w.fp8_max, w.input_scale, bias, out_dtype=out_dtype).double()
    return SpecReference(gemm, gemm + bias64, (x8.abs().double() @ w8.abs().double().t()) * scale, strict,
                         strict - bias64)


def spec_check(y, ref: SpecReference) -> tuple[bool, float, float]:
    """y (any device, any shape [..., N]) against the fp64 evaluation of the spec.

    Pass: |y - exact| <= one bf16 ulp of the result + 2**-10 of sum|x8*w8|*s_x*s_w. The second
    term covers the FP8 tensor cores' narrower accumulation (Hopper keeps about 14 bits inside
    an MMA) and is far below what a wrong nibble, scale or group produces. Returns (pass,
    fraction of outputs within the stricter CPU criterion ``close`` against
    numerics.w4a8_matmul, worst error beyond the result's own bf16 rounding divided by
    sum|x8*w8|*s_x*s_w; 0 when the GEMM is exact)."""
    yy = y.reshape(ref.exact.shape).double().cpu()
    err = (yy - ref.exact).abs()
    rounding = ULP * (ref.exact.abs() + ref.gemm.abs())
    ok = bool((err <= rounding + SPEC_MAG_BOUND * ref.magnitude + 1e-6).all())
    strict = ((yy - ref.strict).abs() <= ULP * (ref.strict.abs() + ref.strict_gemm.abs()) + 1e-5).double().mean()
    worst = ((err - rounding).clamp(min=0) / (ref.magnitude + 1e-30)).max().item()
    return ok, strict.item(), worst
