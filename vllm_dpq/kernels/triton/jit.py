"""The @triton.jit kernels of the Triton backend. Importing this module imports triton: the
launchers (``ops.py``) import it on first use (``ops.kernels()``), so the rest of the package
needs torch alone. Triton resolves the helpers a kernel calls, and ``tl``, through the kernel
function's module globals: they are plain module-level definitions here.

What runs per forward (DPQ spec section 1, exactly):

1. ``act_quant_kernel`` (one program per token row): X bf16/fp16/fp32 -> X8 fp8 e4m3fn
   and s_x fp32 [M]. Dynamic: s_x = max(amax|x| / fp8_max, 2**-126) (``activation_scale``);
   static: s_x = input_scale for every row. X8 = fp8(clamp(x / s_x, +-fp8_max)) with an IEEE
   division (``tl.math.div_rn``: Triton's plain ``/`` on fp32 is an approximate division on
   NVIDIA) and round-to-nearest-even. Bit-exact with ``numerics.quantize_activation``.
2. ``w4a8_gemm_kernel``: per K-tile, load packed INT4 words, unpack nibbles, subtract 8,
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
   ``splitk_reduce_kernel`` adds them in a fixed order (deterministic) and applies the
   epilogue.

``dequant_kernel`` writes the GEMM's weight tiles out (the large-M dequantize +
``torch._scaled_mm`` path, and the tests).

FP8 rounding (``config.rne_modes``, chosen once in ``prepare``). Activations are rounded by an
exact integer emulation of round-to-nearest-even (``to_fp8`` with EMULATE_RNE, which builds the
e4m3 byte itself), in every mode but ``DPQ_TRITON_RNE=hw``: the activation kernel is
memory-bound, and the result then does not depend on how a Triton version lowers
``x.to(tl.float8e4nv)``. That lowering is ``cvt.rn.satfinite.e4m3x2.f32`` (RNE) on
sm_89/90/100 in Triton 3.9 and on sm_90 in 3.6, but Triton 3.6 on sm_89 truncates to fp16 first
(``cvt.rz.f16.f32`` then ``cvt.rn.satfinite.e4m3x2.f16x2``), a double rounding that is wrong
for values just above a midpoint. Weight tiles use the hardware conversion: q * s_g has at most
11 significant bits, so it is exact in fp16 and every lowering rounds it correctly
(``DPQ_TRITON_RNE=emulate`` emulates there too). Triton's CPU interpreter
(``TRITON_INTERPRET=1``; seen in Triton 3.6.0 and 3.9.0) converts fp32 -> fp8 wrongly: ties
away from zero (-400 -> -416, RNE gives -384) and the mantissa carry into the exponent dropped
(126.6 -> 64, not 128), 1494 of 11012 probe values; 3.6 also loses the sign of -0.0. So under
the interpreter everything is emulated. The GPU tests (tests/test_triton_gpu.py, ``pytest -m
gpu``) check both conversions exhaustively.

Unpack modes (``UNPACK``, ``TritonConfig.unpack``): "reshape" loads each word once and expands
it by shifts; "gather" loads each word once per nibble. Both give identical tiles.
"""

import triton
import triton.language as tl


@triton.jit
def to_fp8(v, EMULATE_RNE: tl.constexpr):
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
def dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
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
    return to_fp8(w, EMULATE_RNE)


@triton.jit
def act_quant_kernel(x_ptr, xq_ptr, sx_ptr, s_in_ptr, K, K_OUT, stride_xm, stride_qm, fp8_max,
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
        tl.store(q_row + offs, to_fp8(v, EMULATE_RNE), mask=offs < K_OUT)


@triton.jit
def dequant_kernel(wq_ptr, sg_ptr, out_ptr, K, N, K_OUT, N_OUT, stride_wq, stride_sg, stride_ok, stride_on,
                   fp8_max,
                   GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """The GEMM's weight tiles written out, zero-padded to [K_OUT, N_OUT] (tests; the
    dequantize-then-GEMM path for large M)."""
    k0 = tl.program_id(0) * BLOCK_K
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = k0 + tl.arange(0, BLOCK_K)
    w8 = dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
                      GROUP, PER_CHANNEL, BLOCK_K, BLOCK_N, UNPACK, EMULATE_RNE)
    mask = (rk < K_OUT)[:, None] & (rn < N_OUT)[None, :]
    tl.store(out_ptr + rk.to(tl.int64)[:, None] * stride_ok + rn[None, :] * stride_on, w8, mask=mask)


@triton.jit
def w4a8_gemm_kernel(xq_ptr, sx_ptr, wq_ptr, sg_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr,
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
        b = dequant_tile(wq_ptr, sg_ptr, k0, rn, K, N, stride_wq, stride_sg, fp8_max,
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
def splitk_reduce_kernel(ws_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr, M, N, stride_ym,
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
