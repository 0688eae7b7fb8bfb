"""Triton backend, host side: the resident weight layout (``prepare_weights``) and the
launchers of the kernels in ``jit.py``. Needs torch alone until a kernel is launched: the
first launch imports ``jit`` (and with it triton), through ``kernels()``.

Weight layout (``prepare_weights``). The checkpoint's int32 [N, ceil(K/8)] (nibble i of word j
= column 8j+i, stored as code+8) is transposed once at load to [ceil(K/8), N], and the group
scales [N, G'] to [G', N]: a K-tile of the weight then reads N-contiguous words and scales
(coalesced, vectorised loads across the N dimension of the tile). The nibble order inside a
word is unchanged. Weights stay packed INT4 on the GPU (0.5 byte/weight + scales); the
state holds no reference to the checkpoint tensors, so the caller may free them. The state
also holds the backend's environment, resolved there once (``config.TritonSettings``).

Paths (``linear``): "fused" = ``quantize_activation_fp8`` + ``gemm`` (the fused kernel, split-K
for decode); "dequant" (``linear_dequant``, from M >= $DPQ_TRITON_DEQUANT_M with bf16
activations) = the whole weight dequantized to FP8 once per call + one ``torch._scaled_mm``
(cuBLASLt FP8). Same numerics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_dpq.kernels.base import W4A8Weights
from vllm_dpq.kernels.triton.config import TritonConfig, TritonSettings, pick_config
from vllm_dpq.numerics import FP8_DTYPE


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None if triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


def kernels():
    """The module of @triton.jit kernels (``vllm_dpq.kernels.triton.jit``), imported on first
    use: importing it imports triton and defines the kernels."""
    from vllm_dpq.kernels.triton import jit

    return jit


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
    settings: TritonSettings  # the environment, resolved at prepare

    @property
    def per_channel(self) -> bool:
        return self.group_size >= self.k


def _group_arg(state: TritonState) -> int:
    """GROUP constexpr: unused (1) for per-channel scales, so K does not multiply compilations."""
    return 1 if state.per_channel else state.group_size


def _pad16(v: int) -> int:
    return -(-v // 16) * 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the table's split-K heuristic uses it)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: any number; keeps split-K exercised on small shapes


def prepare_weights(w: W4A8Weights, settings: TritonSettings | None = None) -> TritonState:
    """Validate (``W4A8Weights.check``) and re-lay one layer; ``settings`` defaults to the
    environment, read now."""
    w.check()
    n, k = w.n, w.k
    ws = w.weight_scale.float().reshape(-1)
    ws = ws.expand(n).contiguous()
    return TritonState(
        qweight=w.packed.t().contiguous(),
        scales=w.group_scale.t().contiguous(),
        weight_scale=ws,
        input_scale=None if w.input_scale is None else w.input_scale.float().reshape(1).contiguous(),
        n=n, k=k, group_size=w.group_size, fp8_max=float(w.fp8_max),
        weight_scale_padded=torch.nn.functional.pad(ws, (0, _pad16(n) - n), value=1.0).reshape(1, -1).contiguous(),
        settings=settings if settings is not None else TritonSettings.from_env(),
    )


def quantize_activation_fp8(x2: torch.Tensor, input_scale: torch.Tensor | None, fp8_max: float,
                            k_out: int | None = None, block_k: int | None = None,
                            emulate_rne: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (X8 float8_e4m3fn [M, k_out or K], s_x fp32 [M]); bit-exact with
    ``numerics.quantize_activation``, which returns X8 as fp32 values and s_x as [M, 1] or [1, 1]
    (columns K..k_out-1 are zero). ``emulate_rne``: the exact integer RNE (default; the only
    choice under Triton's interpreter) or the hardware conversion."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    k_out = k if k_out is None else k_out
    xq = torch.empty((m, k_out), dtype=FP8_DTYPE, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m == 0:
        return xq, sx
    bk = block_k or min(1 << (max(k_out, 16) - 1).bit_length(), 2048)  # next power of two
    static = input_scale is not None
    s_in = input_scale.float().reshape(1).contiguous() if static else sx  # dummy pointer when dynamic
    kernels().act_quant_kernel[(m,)](x2, xq, sx, s_in, k, k_out, x2.stride(0), xq.stride(0), float(fp8_max),
                                     STATIC=static, BLOCK_K=bk, EMULATE_RNE=emulate_rne,
                                     num_warps=4 if bk <= 1024 else 8)
    return xq, sx


def dequantize_weight(state: TritonState, layout: str = "nk", k_out: int | None = None, n_out: int | None = None,
                      block_k: int = 64, block_n: int = 64, unpack: str = "reshape") -> torch.Tensor:
    """The FP8 weight the GEMM consumes (float8_e4m3fn), [N, K] ("nk") or [K, N] ("kn"),
    optionally zero-padded to [n_out, k_out]."""
    k_out = state.k if k_out is None else k_out
    n_out = state.n if n_out is None else n_out
    shape = (n_out, k_out) if layout == "nk" else (k_out, n_out)
    out = torch.empty(shape, dtype=FP8_DTYPE, device=state.qweight.device)
    s_ok, s_on = (1, k_out) if layout == "nk" else (n_out, 1)
    grid = (_cdiv(k_out, block_k), _cdiv(n_out, block_n))
    kernels().dequant_kernel[grid](
        state.qweight, state.scales, out, state.k, state.n, k_out, n_out, state.qweight.stride(0),
        state.scales.stride(0), s_ok, s_on, state.fp8_max, GROUP=_group_arg(state), PER_CHANNEL=state.per_channel,
        BLOCK_K=block_k, BLOCK_N=block_n, UNPACK=unpack, EMULATE_RNE=state.settings.emulate_weight_rne)
    return out


def gemm(xq: torch.Tensor, sx: torch.Tensor, state: TritonState, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.bfloat16, config: TritonConfig | None = None) -> torch.Tensor:
    """Fused: Y [M, N] = (X8 @ W8^T) * s_x[:, None] * s_w[None, :] (+ bias), W8 dequantized
    tile by tile from the packed INT4 weight. Config: ``config``, else the state's
    $DPQ_TRITON_CONFIG, else the table's row for this M."""
    m, k = xq.shape
    if k != state.k:
        raise ValueError(f"x has K={k}, the weight K={state.k}")
    n = state.n
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    cfg = config or state.settings.config or pick_config(m, n, k, num_sms(xq.device))
    has_bias = bias is not None
    if has_bias:
        bias = bias.reshape(-1)
        if bias.numel() != n:
            raise ValueError(f"bias has {bias.numel()} elements, expected {n}")
        bias = bias.contiguous()
    split = cfg.split_k
    ws = torch.empty((split, m, n), dtype=torch.float32, device=xq.device) if split > 1 else y
    grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n), split)
    jit = kernels()
    jit.w4a8_gemm_kernel[grid](
        xq, sx, state.qweight, state.scales, state.weight_scale, bias if has_bias else sx, y, ws,
        m, n, k, xq.stride(0), state.qweight.stride(0), state.scales.stride(0), y.stride(0), state.fp8_max,
        GROUP=_group_arg(state), PER_CHANNEL=state.per_channel, HAS_BIAS=has_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, GROUP_M=cfg.group_m,
        UNPACK=cfg.unpack, EMULATE_RNE=state.settings.emulate_weight_rne, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=False)
    if split > 1:
        block = 1024
        jit.splitk_reduce_kernel[(_cdiv(m * n, block),)](
            ws, sx, state.weight_scale, bias if has_bias else sx, y, m, n, y.stride(0),
            SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return y


def linear_dequant(state: TritonState, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large-M path: dequantize the whole weight to FP8 [N16, K16] (one memory-bound kernel),
    then one torch._scaled_mm (cuBLASLt FP8, rowwise s_x / per-channel s_w, bf16 out, bias in
    its fp32 epilogue). Same numerics as the fused kernel. x2 [M, K] bf16 -> y [M, N] bf16."""
    kp, np_ = _pad16(state.k), _pad16(state.n)
    xq, sx = quantize_activation_fp8(x2, state.input_scale, state.fp8_max, k_out=kp,
                                     emulate_rne=state.settings.emulate_act_rne)
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
    GEMM), "dequant" (``linear_dequant``), or "auto": dequant when no ``config`` is given,
    M >= the state's dequant threshold and the output and bias are bf16 (cuBLASLt's rowwise FP8
    output), else fused."""
    shape = x.shape
    if shape[-1] != state.k:
        raise ValueError(f"x has K={shape[-1]}, the weight K={state.k}")
    x2 = x.reshape(-1, state.k)
    m = x2.shape[0]
    if path == "auto":
        bf16 = x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
        path = "dequant" if (config is None and bf16 and m > 0 and m >= state.settings.dequant_m
                             and hasattr(torch, "_scaled_mm")) else "fused"
    if path == "dequant":
        if x.dtype != torch.bfloat16:
            raise ValueError(f"the dequant path computes bf16 outputs, x is {x.dtype}")
        y = linear_dequant(state, x2, bias)
    elif path == "fused":
        xq, sx = quantize_activation_fp8(x2, state.input_scale, state.fp8_max,
                                         emulate_rne=state.settings.emulate_act_rne)
        y = gemm(xq, sx, state, bias, out_dtype=x.dtype, config=config)
    else:
        raise ValueError(f"path must be 'auto', 'fused' or 'dequant', got {path!r}")
    return y.reshape(*shape[:-1], state.n)
