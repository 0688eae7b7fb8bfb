"""Stock vLLM's load-time folding of compressed-tensors W4A8-FP8 group scales, as math
(docs/INTEROP.md). Torch only: used by export, import, the plugin's compressed-tensors scheme
and calibration's folded quantizer.

Stock vLLM (``CompressedTensorsW4A8Fp8`` -> ``CutlassW4A8LinearKernel``, Hopper only) does not
compute with S. At load it *folds* S into an FP8 group scale and an fp32 per-channel scale
(``convert_bf16_scales_to_fp8`` in ``vllm/model_executor/layers/quantization/utils/quant_utils.py``,
called from ``CutlassW4A8LinearKernel.process_weights_after_loading``), per output row n:

    c[n]     = max(max_g |S[n, g]| / 448, 1 / (448 * 512))      fp32 (dynamic per-token FP8 quant
    t[n, g]  = fp8(clamp(S[n, g] / c[n], +-448))                 of the scale matrix, one row = one
                                                                 "token": QuantFP8 PER_TOKEN)
    s8[n, g] = fp8(t[n, g] / 8)                                  the FP8 group scale the GEMM uses
    chan[n]  = 8 * c[n]                                          the fp32 per-channel scale

and the CUTLASS mixed-input GEMM looks ``fp8(q * s8)`` up in a table built by
``cutlass_pack_scale_fp8`` (entries ``float_e4m3(float(s8) * v)``, v = -8..-1, positive codes
by negation), so the weight it multiplies is

    W_stock = chan * fp8(q * s8)                       (fp8 = round to nearest even, e4m3fn)

which is exactly our chain ``W_eff = s_w * fp8(q * s_g)`` with s_w = chan (fp32, per channel,
not a power of two) and s_g = s8 (FP8). Hence:

- import (``--quantization dpq`` on a compressed-tensors checkpoint, or
  ``import_compressed_tensors``): s_w := chan, s_g := s8 reproduces stock vLLM's H100 weights
  bit for bit, on any device and at any group size (the fold is the same rule at every G).
- export (``export_compressed_tensors``): S := bf16(s_w * s_g). Stock vLLM re-folds it, which is
  the identity only when each row's largest s_g is 56 (= 448 / 8) and s_w is that row's fold
  channel scale: the "folded" calibration variant (``FoldedChain``) produces exactly such
  scales, so its checkpoints serve bit-identically in stock vLLM; other DPQ checkpoints are
  re-rounded (``ExportReport`` measures by how much).

Division: the CUDA kernel (``dynamic_per_token_scaled_fp8_quant``) computes ``S / c`` (IEEE fp32
division, vLLM builds without fast-math); vLLM's PyTorch fallback ``QuantFP8.forward_native``
computes ``S * (1 / c)``. ``division="ieee"`` (default) models the GPU, ``"reciprocal"`` the
fallback; they differ only when S / c lands within an fp32 ulp of an FP8 rounding midpoint.
"""

from __future__ import annotations

import torch

from vllm_dpq.numerics import FP8_DTYPE, FP8_E4M3_MAX, Scheme, expand_groups, fp8_weight

CUTLASS_GROUP = 128  # CutlassW4A8LinearKernel: group_size 128 only
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_E4M3_MAX * 512.0)  # vLLM's min per-token FP8 scale
LUT_HEADROOM = 8.0  # vLLM divides the FP8 group scale by 8 so that 8 * s8 <= 448
FOLDED_MAX = FP8_E4M3_MAX / LUT_HEADROOM  # 56: the largest group scale of a folded row
DIVISIONS = ("ieee", "reciprocal")


def fold_group_scales(scales: torch.Tensor, division: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Stock vLLM's load-time folding of compressed-tensors group scales.

    scales [..., G'] (bf16 in checkpoints; any float dtype, read exactly as fp32) ->
    (s8 float8_e4m3fn [..., G'], chan fp32 [..., 1]) with ``S ~ chan * s8``. Bit-exact model of
    ``convert_bf16_scales_to_fp8(QuantFP8(dynamic, PER_TOKEN), scales)``.
    """
    if division not in DIVISIONS:
        raise ValueError(f"division must be one of {DIVISIONS}, got {division!r}")
    s = scales.float()
    amax = s.abs().amax(dim=-1, keepdim=True)
    c = torch.clamp(amax / FP8_E4M3_MAX, min=FP8_MIN_SCALING_FACTOR)
    x = s / c if division == "ieee" else s * c.reciprocal()
    t = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    s8 = (t.float() / LUT_HEADROOM).to(FP8_DTYPE)
    return s8, c * LUT_HEADROOM


def folded_effective_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                            division: str = "ieee") -> torch.Tensor:
    """The weight stock vLLM's CUTLASS W4A8 GEMM multiplies: chan * fp8(q * s8), fp32 [N, K].

    q: INT4 codes [N, K] (int8), scales: the checkpoint's group scales S [N, ceil(K/G)]."""
    s8, chan = fold_group_scales(scales, division)
    k = q.shape[1]
    return chan * fp8_weight(q, expand_groups(s8.float(), k, group_size), FP8_E4M3_MAX)


def w4a16_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """compressed-tensors' own dequantization ``bf16(q * S)`` (what ``decompress`` returns)."""
    k = q.shape[1]
    return (q.to(scales.dtype) * expand_groups(scales, k, group_size)).to(scales.dtype)


def export_group_scales(s_w: torch.Tensor, s_g: torch.Tensor) -> torch.Tensor:
    """Our (s_w [1] or [N], s_g [N, G']) -> compressed-tensors' bf16 S = s_g * s_w.

    Exact when s_w is a power of two (DPQ's s_w) and s_g is bf16 or FP8."""
    return (s_g.float() * s_w.float().reshape(-1, 1)).to(torch.bfloat16)


def fold_fixed_point(s_w: torch.Tensor, s_g: torch.Tensor, division: str = "ieee") -> torch.Tensor:
    """Per row: does exporting (s_w, s_g) and folding it again give back exactly (s_w, s_g)?
    True for every row means stock vLLM computes our W_eff bit for bit."""
    n = s_g.shape[0]
    s8, chan = fold_group_scales(export_group_scales(s_w, s_g), division)
    same_g = (s8.float() == s_g.float()).all(dim=1)
    same_w = chan.reshape(-1) == s_w.float().reshape(-1).expand(n)
    return same_g & same_w


def ct_scales_to_dpq(scales: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors S -> our (s_g float8_e4m3fn [N, G'], s_w fp32 [N]) for serving.

    Group strategy: the fold, so that W_eff = stock vLLM's H100 weight (any group size).
    Channel strategy (one scale per row; stock vLLM has no W4A8 path for it): s_w = S, s_g = 1,
    which is exact: W_eff = S * fp8(q) = S * q (every INT4 code is an FP8 value)."""
    if per_channel:
        return torch.ones_like(scales, dtype=torch.float32).to(FP8_DTYPE), scales.float().reshape(-1)
    s8, chan = fold_group_scales(scales)
    return s8, chan.reshape(-1)


def folded_scheme(group_size: int = CUTLASS_GROUP) -> Scheme:
    """The DPQ scheme of the folded variant: per-channel fp32 s_w, FP8 group scales, FP8 e4m3fn
    (448), dynamic per-token activations (the only activations stock vLLM's W4A8 path has)."""
    return Scheme(group_size=group_size, fp8_max=FP8_E4M3_MAX, weight_scale="channel",
                  group_scale_dtype="float8_e4m3fn", activation_scheme="dynamic")


def folded_channel_scale(anchor: torch.Tensor) -> torch.Tensor:
    """chan [N] for rows whose largest group scale (in weight units) is ``anchor`` [N]: the value
    vLLM derives from that bf16 scale, 8 * max(bf16(anchor) / 448, 1 / (448 * 512))."""
    a = anchor.float().to(torch.bfloat16).float()
    return torch.clamp(a / FP8_E4M3_MAX, min=FP8_MIN_SCALING_FACTOR) * LUT_HEADROOM


def pin_row_max(s8: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    """Make (chan, s8) a fixed point of the fold: every row whose channel scale is not vLLM's
    minimum needs a group scale of exactly 56 (its largest group is set to 56; none exceeds it)."""
    s8 = s8.clone()
    pin = chan.reshape(-1) / LUT_HEADROOM > FP8_MIN_SCALING_FACTOR
    rows = torch.nonzero(pin).flatten()
    s8[rows, s8[rows].argmax(dim=1)] = FOLDED_MAX
    return s8


def folded_scheme_problems(scheme: Scheme) -> list[str]:
    out = []
    if scheme.weight_scale != "channel":
        out.append("weight_scale must be 'channel' (vLLM's channel scale is fp32, not a power of two)")
    if scheme.group_scale_dtype != "float8_e4m3fn":
        out.append("group_scale_dtype must be 'float8_e4m3fn'")
    if scheme.fp8_max != FP8_E4M3_MAX:
        out.append(f"fp8_max must be {FP8_E4M3_MAX:g}")
    return out
