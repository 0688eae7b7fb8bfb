"""Triton backend: fused W4A8-FP8 GEMM for NVIDIA GPUs of compute capability >= 8.9
(Ada SM89, Hopper SM90, Blackwell SM100/SM120). Importable with torch alone: Triton is
imported lazily, the first time a kernel is built.

What runs per forward (DPQ spec section 1, exactly):

1. ``_act_quant_kernel`` (one program per token row): X bf16/fp16/fp32 -> X8 fp8 e4m3fn
   and s_x fp32 [M]. Dynamic: s_x = max(amax|x| / fp8_max, 2**-126) (``activation_scale``);
   static: s_x = input_scale for every row. X8 = fp8(clamp(x / s_x, +-fp8_max)) with an IEEE
   division (``tl.math.div_rn``: Triton's plain ``/`` on fp32 is an approximate division on
   NVIDIA) and round-to-nearest-even. Bit-exact with ``numerics.quantize_activation``.
2. ``_w4a8_gemm_kernel``: per K-tile, load packed INT4 words, unpack nibbles, subtract 8,
   multiply by the group scale (bf16 or fp8, upcast exactly to fp32; column k belongs to group
   k // G, so a ragged last group needs nothing special), clamp to +-fp8_max, round to e4m3
   (RNE), then ``tl.dot`` FP8 x FP8 with fp32 accumulation. The product q * s_g is exact in
   fp32 (4-bit code times an 8-bit-mantissa scale), so the tile equals
   ``W4A8Weights.fp8_values()`` bit for bit. Epilogue: acc * s_x[m] * s_w[n] (+ bias[n]),
   stored in x's dtype (FMA contraction off: the epilogue rounds like the reference). On
   Hopper the FP8 tensor-core accumulator is narrower than fp32; ``max_num_imprecise_acc=
   BLOCK_K`` makes Triton promote the partial sums into a true fp32 accumulator after every
   K-tile (CUTLASS's "two-level accumulation"), instead of Triton's SM90 default of never
   promoting.
3. Split-K (decode, small M): partial fp32 sums go to a workspace [SPLIT_K, M, N] and
   ``_splitk_reduce_kernel`` adds them in a fixed order (deterministic) and applies the
   epilogue.

FP8 rounding (``rne_modes``). Activations are rounded by an exact integer emulation of
round-to-nearest-even (``_to_fp8`` with EMULATE_RNE, which builds the e4m3 byte itself), in
every mode but ``VLLM_DPQ_TRITON_RNE=hw``: the activation kernel is memory-bound, and the
result then does not depend on how a Triton version lowers ``x.to(tl.float8e4nv)``. That
lowering is ``cvt.rn.satfinite.e4m3x2.f32`` (RNE) on sm_89/90/100 in Triton 3.9 and on sm_90
in 3.6, but Triton 3.6 on sm_89 truncates to fp16 first (``cvt.rz.f16.f32`` then
``cvt.rn.satfinite.e4m3x2.f16x2``), a double rounding that is wrong for values just above a
midpoint. Weight tiles use the hardware conversion: q * s_g has at most 11 significant bits,
so it is exact in fp16 and every lowering rounds it correctly (``VLLM_DPQ_TRITON_RNE=emulate``
emulates there too). Triton's CPU interpreter (``TRITON_INTERPRET=1``; seen in Triton 3.6.0
and 3.9.0) converts fp32 -> fp8 wrongly: ties away from zero (-400 -> -416, RNE gives -384)
and the mantissa carry into the exponent dropped (126.6 -> 64, not 128), 1494 of 11012 probe
values; 3.6 also loses the sign of -0.0. So under the interpreter everything is emulated.
``benchmarks/gpu_check.py`` checks both conversions exhaustively on the GPU.

Weight layout (``prepare``). The checkpoint's int32 [N, ceil(K/8)] (nibble i of word j =
column 8j+i, stored as code+8) is transposed once at load to [ceil(K/8), N], and the group
scales [N, G'] to [G', N]: a K-tile of the weight then reads N-contiguous words and scales
(coalesced, vectorised loads across the N dimension of the tile). The nibble order inside a
word is unchanged. Weights stay packed INT4 on the GPU (0.5 byte/weight + scales); the
state holds no reference to the checkpoint tensors, so the caller may free them.

Unpack modes (``TritonConfig.unpack``): "reshape" (default) loads each word once, expands
[BK/8, BN] -> [BK/8, 8, BN] by shifts and reshapes to [BK, BN]; "gather" loads each word
once per nibble and shifts by 4*(k % 8): simpler, but Triton's pipeliner stages the 8x
duplicated loads in shared memory (about 5x the shared memory, more registers). Both give
identical tiles.

Configs: a small table by M (``CONFIG_TABLE``/``pick_config``): BLOCK_M 16-64 with split-K
for decode, larger tiles for prefill; $VLLM_DPQ_TRITON_CONFIG="BM,BN,BK,SPLIT,WARPS,STAGES
[,UNPACK]" overrides it (tuning). From M >= $VLLM_DPQ_TRITON_DEQUANT_M (default 1024) and
bf16 activations, ``linear`` instead dequantizes the weight to FP8 once per call (a
memory-bound kernel) and runs one ``torch._scaled_mm`` (cuBLASLt FP8): at large M the GEMM
dominates and the dequantization costs about 325/M of it on an H100, so cuBLASLt's FP8 GEMM
is expected to win there (not yet measured: benchmarks/gemm.py times both paths at every M
so the threshold can be set from data). Same numerics. A huge value keeps the fused kernel.

Offline checks (tests/test_triton_kernel.py): the table's configs compile with Triton's own
ptxas for sm_89, sm_90, sm_100 (and sm_120) without register spills; sm_90 uses wgmma
e4m3 from BLOCK_M 64 (mma.sync with an exact fp8->f16 upcast below), sm_89/sm_120 mma.sync
e4m3, sm_100 tcgen05 f8f6f4.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.numerics import FP8_DTYPE

ENV_RNE = "VLLM_DPQ_TRITON_RNE"  # "auto" (default), "hw" or "emulate": see rne_modes()
ENV_CONFIG = "VLLM_DPQ_TRITON_CONFIG"
ENV_DEQUANT_M = "VLLM_DPQ_TRITON_DEQUANT_M"  # M from which dequantize + torch._scaled_mm is used
DEFAULT_DEQUANT_M = 1024
MIN_CAPABILITY = (8, 9)
SPLIT_K_CHOICES = (1, 2, 4, 8, 16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None if triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------- kernels

@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the @triton.jit kernels on first use (triton is imported here, not at module
    import). They are bound as module globals: Triton resolves the helpers a kernel calls,
    and ``tl``, through the kernel function's globals."""
    global triton, tl, _to_fp8, _dequant_tile, _act_quant_kernel, _dequant_kernel
    global _w4a8_gemm_kernel, _splitk_reduce_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _to_fp8(v, EMULATE_RNE: tl.constexpr):
        """fp32 v, already clamped to +-fp8_max (<= 448) -> float8e4nv, round to nearest even."""
        if EMULATE_RNE:
            # Builds the e4m3 byte with integer arithmetic (no float->fp8 conversion involved).
            vbits = v.to(tl.int32, bitcast=True)
            sign = (vbits >> 24) & 0x80  # fp32 sign bit -> bit 7 (keeps -0.0)
            a = tl.abs(v)
            abits = a.to(tl.int32, bitcast=True)
            # normal range (|v| >= 2**-6): round the fp32 mantissa to 3 bits, ties to even; a
            # carry out of the mantissa bumps the exponent, as it should
            r = (abits + 0x7FFFF + ((abits >> 20) & 1)) & -1048576  # ~0xFFFFF
            normal = ((r >> 23) - 120) * 8 + ((r >> 20) & 7)  # e4m3 exponent bias 7 (fp32: 127)
            # subnormal range (|v| < 2**-6): multiples of 2**-9. Adding 2**14 puts |v| in the
            # binade where the fp32 spacing is 2**-9, so the addition rounds (RNE) for us; the
            # count of 2**-9 steps (0..8; 8 = 2**-6, the smallest normal) is the byte itself.
            sub = (((a + 16384.0) - 16384.0) * 512.0).to(tl.int32)
            code = tl.where(a < 0.015625, sub, normal) | sign
            return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        else:
            return v.to(tl.float8e4nv)

    @triton.jit
    def _dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
                      GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, EMULATE_RNE: tl.constexpr):
        """FP8 weight tile [BLOCK_K, BLOCK_N] for columns k0.. of W^T: fp8(clamp(q * s_g))."""
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        mask_n = rn < N
        mask = mask_k[:, None] & mask_n[None, :]
        if UNPACK == "reshape":
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            wmask = (rw < (K + 7) // 8)[:, None] & mask_n[None, :]
            words = tl.load(wq_ptr + rw.to(tl.int64)[:, None] * stride_wq + rn[None, :], mask=wmask, other=0)
            shifts = tl.arange(0, 8) * 4
            nib = (words[:, None, :] >> shifts[None, :, None]) & 0xF
            q = tl.reshape(nib, (BLOCK_K, BLOCK_N)) - 8
        else:
            words = tl.load(wq_ptr + (rk // 8).to(tl.int64)[:, None] * stride_wq + rn[None, :], mask=mask, other=0)
            q = ((words >> ((rk % 8) * 4)[:, None]) & 0xF) - 8
        if PER_CHANNEL:
            sg = tl.load(sg_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        elif GROUP % BLOCK_K == 0:
            # k0 is a multiple of BLOCK_K, which divides GROUP: the whole tile is one group
            sg = tl.load(sg_ptr + (k0 // GROUP) * stride_sg + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            sg = tl.load(sg_ptr + (rk // GROUP)[:, None] * stride_sg + rn[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        w = q.to(tl.float32) * sg  # exact: 4-bit code x 8-bit-mantissa scale
        w = tl.minimum(tl.maximum(w, -fp8_max), fp8_max)
        w = tl.where(mask, w, 0.0)
        return _to_fp8(w, EMULATE_RNE)

    @triton.jit
    def _act_quant_kernel(x_ptr, xq_ptr, sx_ptr, s_in_ptr, K, K_OUT, stride_xm, stride_qm, fp8_max,
                          STATIC: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_RNE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = xq_ptr + row * stride_qm
        if STATIC:
            s = tl.load(s_in_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.math.div_rn(tl.max(amax, axis=0), fp8_max)
            s = tl.maximum(s, 1.1754943508222875e-38)  # torch.finfo(float32).tiny
        tl.store(sx_ptr + row, s)
        for k0 in range(0, K_OUT, BLOCK_K):  # columns K..K_OUT-1 (alignment padding) get 0
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            v = tl.math.div_rn(v, s)
            v = tl.minimum(tl.maximum(v, -fp8_max), fp8_max)
            tl.store(q_row + offs, _to_fp8(v, EMULATE_RNE), mask=offs < K_OUT)

    @triton.jit
    def _dequant_kernel(wq_ptr, sg_ptr, out_ptr, K, N, K_OUT, N_OUT, stride_wq, stride_sg, stride_ok, stride_on,
                        fp8_max,
                        GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, EMULATE_RNE: tl.constexpr):
        """The GEMM's weight tiles written out, zero-padded to [K_OUT, N_OUT] (tests; the
        dequantize-then-GEMM path for large M)."""
        k0 = tl.program_id(0) * BLOCK_K
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = k0 + tl.arange(0, BLOCK_K)
        w8 = _dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
                           GROUP, PER_CHANNEL, BLOCK_K, BLOCK_N, UNPACK, EMULATE_RNE)
        mask = (rk < K_OUT)[:, None] & (rn < N_OUT)[None, :]
        tl.store(out_ptr + rk.to(tl.int64)[:, None] * stride_ok + rn[None, :] * stride_on, w8, mask=mask)

    @triton.jit
    def _w4a8_gemm_kernel(xq_ptr, sx_ptr, wq_ptr, sg_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr,
                          M, N, K, stride_xm, stride_wq, stride_sg, stride_ym, fp8_max,
                          GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, UNPACK: tl.constexpr,
                          EMULATE_RNE: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        # grouped tile order: GROUP_M row-tiles share each weight column-tile while in L2
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_in_group = GROUP_M * num_pid_n
        first_m = (pid // num_in_group) * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % num_in_group) % group_rows
        pid_n = (pid % num_in_group) // group_rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm

        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t0 = pid_k * per_split
        t1 = tl.minimum(t0 + per_split, k_tiles)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
            b = _dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
                              GROUP, PER_CHANNEL, BLOCK_K, BLOCK_N, UNPACK, EMULATE_RNE)
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)

        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            sx = tl.load(sx_ptr + rm, mask=mask_m, other=0.0)
            sw = tl.load(sw_ptr + rn, mask=mask_n, other=0.0)
            y = acc * sx[:, None] * sw[None, :]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            ws = ws_ptr + pid_k.to(tl.int64) * M * N
            tl.store(ws + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mask)

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr, M, N, stride_ym,
                              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        total = M * N
        mask = offs < total
        m = offs // N
        n = offs % N
        acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(ws_ptr + s * total + offs, mask=mask, other=0.0)
        sx = tl.load(sx_ptr + m, mask=mask, other=0.0)
        sw = tl.load(sw_ptr + n, mask=mask, other=0.0)
        y = acc * sx * sw
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=mask)

    return {
        "act_quant": _act_quant_kernel,
        "dequant": _dequant_kernel,
        "gemm": _w4a8_gemm_kernel,
        "reduce": _splitk_reduce_kernel,
    }


# ----------------------------------------------------------------------------- host side

@dataclass(frozen=True)
class TritonConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    unpack: str = "reshape"  # or "gather"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.block_k < 32:
            raise ValueError("block_k must be >= 32 (FP8 MMA instruction K)")
        if self.split_k not in SPLIT_K_CHOICES:
            raise ValueError(f"split_k must be one of {SPLIT_K_CHOICES}, got {self.split_k}")
        if self.unpack not in ("gather", "reshape"):
            raise ValueError(f"unpack must be 'gather' or 'reshape', got {self.unpack!r}")


@dataclass
class TritonState:
    """What ``prepare`` keeps resident (no reference to the checkpoint tensors)."""

    qweight: torch.Tensor  # int32 [ceil(K/8), N]: the checkpoint packing, transposed
    scales: torch.Tensor  # bf16 or float8_e4m3fn [ceil(K/G), N]
    weight_scale: torch.Tensor  # fp32 [N] (a per-tensor scale is broadcast)
    input_scale: torch.Tensor | None  # fp32 [1] (static) or None (dynamic per token)
    n: int
    k: int
    group_size: int  # effective
    fp8_max: float
    weight_scale_padded: torch.Tensor  # fp32 [1, N rounded up to 16] (pad 1.0): scale_b of linear_dequant

    @property
    def per_channel(self) -> bool:
        return self.group_size >= self.k



def _group_arg(state: TritonState) -> int:
    """GROUP constexpr: unused (1) for per-channel scales, so K does not multiply compilations."""
    return 1 if state.per_channel else state.group_size


def _pad16(v: int) -> int:
    return -(-v // 16) * 16


def rne_modes() -> tuple[bool, bool]:
    """(activation kernel emulates RNE, weight tiles emulate RNE).

    auto (default): activations always use the exact integer emulation (the activation kernel
    is memory-bound, so it costs nothing, and it does not depend on how a Triton version lowers
    fp32 -> e4m3: Triton 3.6 on sm_89 goes through a round-toward-zero fp16, which mis-rounds
    about 0.2% of arbitrary fp32 values); weight tiles use the hardware conversion, which is
    exact for them on every lowering because q * s_g has at most 11 significant bits (and any
    product below 2**-14 rounds to 0 either way). hw / emulate: both hardware / both emulated.
    Under Triton's interpreter both always emulate (its own conversion is wrong)."""
    if interpreting():
        return True, True
    mode = os.environ.get(ENV_RNE, "auto")
    if mode not in ("auto", "hw", "emulate"):
        raise ValueError(f"{ENV_RNE}={mode!r}: choose 'auto', 'hw' or 'emulate'")
    return mode != "hw", mode == "emulate"


def dequant_threshold() -> int:
    """Smallest M served by dequantize-to-FP8 + torch._scaled_mm instead of the fused kernel."""
    raw = os.environ.get(ENV_DEQUANT_M, str(DEFAULT_DEQUANT_M))
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_DEQUANT_M}={raw!r}: expected an integer (M threshold)") from e


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: any number; keeps split-K exercised on small shapes


def _config_from_env() -> TritonConfig | None:
    spec = os.environ.get(ENV_CONFIG)
    if not spec:
        return None
    parts = [p.strip() for p in spec.split(",")]
    try:
        bm, bn, bk, split, warps, stages = (int(p) for p in parts[:6])
    except ValueError as e:
        raise ValueError(f"{ENV_CONFIG}={spec!r}: expected BM,BN,BK,SPLIT,WARPS,STAGES[,UNPACK]") from e
    unpack = parts[6] if len(parts) > 6 else "reshape"
    return TritonConfig(bm, bn, bk, split, warps, stages, unpack=unpack)


# M bucket -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Chosen from offline
# compiles (triton 3.9, ptxas from its wheel) for sm_89, sm_90, sm_100 and sm_120 at group
# sizes 32 and 128: none spills registers. Below BLOCK_M 64 Triton uses mma.sync (on SM90/100
# through an exact fp8->f16 upcast); from BLOCK_M 64 wgmma (SM90) / tcgen05 (SM100) FP8.
CONFIG_TABLE = (
    (16, (16, 64, 64, 4, 4)),
    (32, (32, 128, 64, 4, 4)),
    (64, (64, 64, 64, 4, 4)),
    (256, (64, 128, 128, 8, 3)),
    (None, (128, 128, 64, 8, 2)),
)


def pick_config(m: int, n: int, k: int, num_sms: int = 132) -> TritonConfig:
    """The heuristic table. Decode (small M) is bound by the weight stream: small BLOCK_M and
    split-K so that about two programs per SM stream INT4 words; the split-K workspace
    (SPLIT*M*N*4 bytes, written and read once) is kept under a quarter of the weight bytes.
    Prefill is bound by the FP8 MMA and the dequantization ALU work: bigger tiles amortise the
    dequantization of each weight tile over BLOCK_M rows."""
    env = _config_from_env()
    if env is not None:
        return env
    for limit, (bm, bn, bk, warps, stages) in CONFIG_TABLE:
        if limit is None or m <= limit:
            break
    cfg = TritonConfig(bm, bn, bk, num_warps=warps, num_stages=stages)
    if m <= 64:
        tiles = -(-m // bm) * -(-n // bn)
        k_tiles = -(-k // bk)
        want = -(-2 * num_sms // tiles)  # programs needed for ~2 per SM
        cap_ws = max(1, k // (32 * m))  # SPLIT*M*N*4 <= (N*K/2) / 4
        cap = min(want, cap_ws, max(1, k_tiles // 2), SPLIT_K_CHOICES[-1])
        cfg = replace(cfg, split_k=max(s for s in SPLIT_K_CHOICES if s <= cap))
    return cfg


def prepare_weights(w: W4A8Weights) -> TritonState:
    if w.group_size <= 0:
        raise ValueError(f"effective group size must be positive, got {w.group_size}")
    n, k = w.n, w.k
    if tuple(w.packed.shape) != (n, -(-k // 8)) or w.packed.dtype != torch.int32:
        raise ValueError(f"packed weight must be int32 [{n}, {-(-k // 8)}], got {w.packed.dtype} "
                         f"{tuple(w.packed.shape)}")
    groups = -(-k // w.group_size)
    if tuple(w.group_scale.shape) != (n, groups):
        raise ValueError(f"group scales must be [{n}, {groups}], got {tuple(w.group_scale.shape)}")
    if w.group_scale.dtype not in (torch.bfloat16, FP8_DTYPE):
        raise ValueError(f"group scales must be bf16 or float8_e4m3fn, got {w.group_scale.dtype}")
    ws = w.weight_scale.float().reshape(-1)
    if ws.numel() not in (1, n):
        raise ValueError(f"weight scale must have 1 or {n} elements, got {ws.numel()}")
    ws = ws.expand(n).contiguous()
    return TritonState(
        qweight=w.packed.t().contiguous(),
        scales=w.group_scale.t().contiguous(),
        weight_scale=ws,
        input_scale=None if w.input_scale is None else w.input_scale.float().reshape(1).contiguous(),
        n=n, k=k, group_size=w.group_size, fp8_max=float(w.fp8_max),
        weight_scale_padded=torch.nn.functional.pad(ws, (0, _pad16(n) - n), value=1.0).reshape(1, -1).contiguous(),
    )


def quantize_activation(x2: torch.Tensor, input_scale: torch.Tensor | None, fp8_max: float,
                        k_out: int | None = None, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (X8 float8_e4m3fn [M, k_out or K], s_x fp32 [M]); bit-exact with
    numerics.quantize_activation (columns K..k_out-1 are zero)."""
    import triton

    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    k_out = k if k_out is None else k_out
    xq = torch.empty((m, k_out), dtype=FP8_DTYPE, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, sx
    bk = block_k or min(triton.next_power_of_2(max(k_out, 16)), 2048)
    static = input_scale is not None
    s_in = input_scale.float().reshape(1).contiguous() if static else sx  # dummy pointer when dynamic
    _kernels()["act_quant"][(m,)](x2, xq, sx, s_in, k, k_out, x2.stride(0), xq.stride(0), float(fp8_max),
                                  STATIC=static, BLOCK_K=bk, EMULATE_RNE=rne_modes()[0],
                                  num_warps=4 if bk <= 1024 else 8)
    return xq, sx


def dequantize_weight(state: TritonState, layout: str = "nk", k_out: int | None = None, n_out: int | None = None,
                      block_k: int = 64, block_n: int = 64, unpack: str = "reshape") -> torch.Tensor:
    """The FP8 weight the GEMM consumes (float8_e4m3fn), [N, K] ("nk") or [K, N] ("kn"),
    optionally zero-padded to [n_out, k_out]."""
    import triton

    k_out = state.k if k_out is None else k_out
    n_out = state.n if n_out is None else n_out
    shape = (n_out, k_out) if layout == "nk" else (k_out, n_out)
    out = torch.empty(shape, dtype=FP8_DTYPE, device=state.qweight.device)
    s_ok, s_on = (1, k_out) if layout == "nk" else (n_out, 1)
    grid = (triton.cdiv(k_out, block_k), triton.cdiv(n_out, block_n))
    _kernels()["dequant"][grid](
        state.qweight, state.scales, out, state.k, state.n, k_out, n_out, state.qweight.stride(0),
        state.scales.stride(0), s_ok, s_on, state.fp8_max, GROUP=_group_arg(state), PER_CHANNEL=state.per_channel,
        BLOCK_K=block_k, BLOCK_N=block_n, UNPACK=unpack, EMULATE_RNE=rne_modes()[1])
    return out


def gemm(xq: torch.Tensor, sx: torch.Tensor, state: TritonState, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.bfloat16, config: TritonConfig | None = None) -> torch.Tensor:
    """Fused: Y [M, N] = (X8 @ W8^T) * s_x[:, None] * s_w[None, :] (+ bias), W8 dequantized
    tile by tile from the packed INT4 weight."""
    import triton

    m, k = xq.shape
    if k != state.k:
        raise ValueError(f"x has K={k}, the weight K={state.k}")
    n = state.n
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    cfg = config or pick_config(m, n, k, _sms(xq.device))
    has_bias = bias is not None
    if has_bias:
        bias = bias.reshape(-1)
        if bias.numel() != n:
            raise ValueError(f"bias has {bias.numel()} elements, expected {n}")
        bias = bias.contiguous()
    split = cfg.split_k
    ws = torch.empty((split, m, n), dtype=torch.float32, device=xq.device) if split > 1 else y
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _kernels()["gemm"][grid](
        xq, sx, state.qweight, state.scales, state.weight_scale, bias if has_bias else sx, y, ws,
        m, n, k, xq.stride(0), state.qweight.stride(0), state.scales.stride(0), y.stride(0), state.fp8_max,
        GROUP=_group_arg(state), PER_CHANNEL=state.per_channel, HAS_BIAS=has_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, GROUP_M=cfg.group_m,
        UNPACK=cfg.unpack, EMULATE_RNE=rne_modes()[1], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False)
    if split > 1:
        block = 1024
        _kernels()["reduce"][(triton.cdiv(m * n, block),)](
            ws, sx, state.weight_scale, bias if has_bias else sx, y, m, n, y.stride(0),
            SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return y


def linear_dequant(state: TritonState, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large-M path: dequantize the whole weight to FP8 [N16, K16] (one memory-bound kernel),
    then one torch._scaled_mm (cuBLASLt FP8, rowwise s_x / per-channel s_w, bf16 out, bias in
    its fp32 epilogue). Same numerics as the fused kernel. x2 [M, K] bf16 -> y [M, N] bf16."""
    kp, np_ = _pad16(state.k), _pad16(state.n)
    xq, sx = quantize_activation(x2, state.input_scale, state.fp8_max, k_out=kp)
    w8 = dequantize_weight(state, layout="nk", k_out=kp, n_out=np_)
    if bias is not None:
        bias = bias.reshape(-1).to(torch.bfloat16)
        if np_ != state.n:
            bias = torch.nn.functional.pad(bias, (0, np_ - state.n))
    y = torch._scaled_mm(xq, w8.t(), scale_a=sx.reshape(-1, 1), scale_b=state.weight_scale_padded,
                         bias=bias, out_dtype=torch.bfloat16)
    return y[:, : state.n] if np_ != state.n else y


def linear(state: TritonState, x: torch.Tensor, bias: torch.Tensor | None = None,
           config: TritonConfig | None = None, path: str = "auto") -> torch.Tensor:
    """x [..., K] -> y [..., N] in x's dtype. path: "fused" (activation quantization + fused
    GEMM), "dequant" (``linear_dequant``), or "auto": dequant when M >= dequant_threshold()
    and the output and bias are bf16 (cuBLASLt's rowwise FP8 output), else fused."""
    shape = x.shape
    if shape[-1] != state.k:
        raise ValueError(f"x has K={shape[-1]}, the weight K={state.k}")
    x2 = x.reshape(-1, state.k)
    m = x2.shape[0]
    if path == "auto":
        bf16 = x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
        path = "dequant" if (config is None and bf16 and m > 0 and m >= dequant_threshold()
                             and hasattr(torch, "_scaled_mm")) else "fused"
    if path == "dequant":
        if x.dtype != torch.bfloat16:
            raise ValueError(f"the dequant path computes bf16 outputs, x is {x.dtype}")
        y = linear_dequant(state, x2, bias)
    elif path == "fused":
        xq, sx = quantize_activation(x2, state.input_scale, state.fp8_max)
        y = gemm(xq, sx, state, bias, out_dtype=x.dtype, config=config)
    else:
        raise ValueError(f"path must be 'auto', 'fused' or 'dequant', got {path!r}")
    return y.reshape(*shape[:-1], state.n)


class TritonBackend(Backend):
    """Fused W4A8-FP8 Triton GEMM; INT4 weights stay packed on the GPU."""

    name = "triton"

    def unsupported(self, w, device):
        device = torch.device(device)
        if device.type != "cuda":
            return f"runs on CUDA GPUs only, not {device.type}"
        err = triton_import_error()
        if err is not None:
            return f"triton is not importable ({err})"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return f"needs FP8 tensor cores (compute capability >= 8.9), this GPU has {cap[0]}.{cap[1]}"
        if w.group_size <= 0:
            return f"group size {w.group_size} is not positive"
        if w.group_scale.dtype not in (torch.bfloat16, FP8_DTYPE):
            return f"group scales of dtype {w.group_scale.dtype} (needs bf16 or float8_e4m3fn)"
        if not (0 < w.fp8_max <= 448.0):
            return f"fp8_max {w.fp8_max} outside (0, 448]"
        return None

    def prepare(self, w: W4A8Weights) -> TritonState:
        return prepare_weights(w)

    def apply(self, state: TritonState, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if _LINEAR_OP is None:  # a torch without torch.library.custom_op
            return linear(state, x, bias)
        return _LINEAR_OP(x, state.qweight, state.scales, state.weight_scale, state.weight_scale_padded,
                          state.input_scale, bias, state.n, state.k, state.group_size, state.fp8_max)


# One opaque op for torch.compile (vLLM compiles the model with fullgraph=True: Dynamo must not
# trace into the Triton launches, env look-ups and caches of ``linear``). Registered at import;
# needs no triton.
def _linear_op_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, weight_scale: torch.Tensor,
                    weight_scale_padded: torch.Tensor, input_scale: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], n: int, k: int, group_size: int, fp8_max: float) -> torch.Tensor:
    state = TritonState(qweight, scales, weight_scale, input_scale, n, k, group_size, fp8_max, weight_scale_padded)
    y = linear(state, x, bias)
    return y if y.is_contiguous() else y.contiguous()


def _linear_op_fake(x, qweight, scales, weight_scale, weight_scale_padded, input_scale, bias, n, k, group_size,
                    fp8_max):
    return x.new_empty((*x.shape[:-1], n))


def _register_linear_op():
    if not hasattr(torch.library, "custom_op"):
        return None
    try:
        op = torch.library.custom_op("vllm_dpq::triton_w4a8_linear", mutates_args=())(_linear_op_impl)
        op.register_fake(_linear_op_fake)
        return op
    except Exception:  # registered already (module re-executed), or an older torch.library
        ns = getattr(torch.ops, "vllm_dpq", None)
        return getattr(ns, "triton_w4a8_linear", None) if ns is not None else None


_LINEAR_OP = _register_linear_op()


__all__ = ["TritonBackend", "TritonConfig", "TritonState", "pick_config", "prepare_weights", "quantize_activation",
           "dequantize_weight", "gemm", "linear", "linear_dequant", "interpreting", "rne_modes", "dequant_threshold"]
