"""The one definition of the W4A8-FP8 numerics (docs/FORMAT.md, DPQ spec sections 1-2).

Everything that quantizes (calibration) or computes (kernels, reference forward) goes
through these functions, so there is exactly one place where the chain is written down:

    PR    = fp8_max - fp8_max / 15
    s_w   = 2 ** ceil(log2(max|W| / PR))            per tensor, or per output channel
    W8    = fp8(clamp(W / s_w, -PR, PR))
    s_g   = 2 * max|W8[group]| / 15                 rounded to the stored scale dtype
    q     = clamp(round((W / s_w) / s_g), -8, 7)    one rounding, from the un-cast weight
    W_eff = s_w * fp8(clamp(q * s_g, -fp8_max, fp8_max))

Groups run along K (the input dimension). When K is not a multiple of the group size the
last group is shorter ("ragged last group"): scales have ceil(K / G) columns and column k
belongs to group k // G. Per-channel group scales are group_size = -1 (one group of K).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0
INT4_MIN, INT4_MAX = -8, 7

SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Scheme:
    """Numerics parameters of a W4A8-FP8 layer. Serialised into the checkpoint config."""

    group_size: int = 32  # -1: one group per output channel
    fp8_max: float = FP8_E4M3_MAX  # 240.0 reproduces Gaudi's e4m3fnuz range
    weight_scale: Literal["tensor", "channel"] = "tensor"
    group_scale_dtype: Literal["bfloat16", "float8_e4m3fn"] = "bfloat16"
    activation_scheme: Literal["static", "dynamic"] = "dynamic"

    def __post_init__(self):
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")
        if not (0 < self.fp8_max <= FP8_E4M3_MAX) or not math.isfinite(self.fp8_max):
            raise ValueError(f"fp8_max must be in (0, {FP8_E4M3_MAX}], got {self.fp8_max}")
        if self.weight_scale not in ("tensor", "channel"):
            raise ValueError(f"weight_scale must be 'tensor' or 'channel', got {self.weight_scale!r}")
        if self.group_scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"group_scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.group_scale_dtype!r}"
            )
        if self.activation_scheme not in ("static", "dynamic"):
            raise ValueError(
                f"activation_scheme must be 'static' or 'dynamic', got {self.activation_scheme!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.group_scale_dtype]

    def group(self, k: int) -> int:
        """The effective group size for a layer with input dimension k."""
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        return -(-k // self.group(k))


def protective_range(fp8_max: float) -> float:
    """Largest |W / s_w| kept, so that 8 * s_g can never exceed fp8_max."""
    return fp8_max - fp8_max / 15


def fp8_round(x: torch.Tensor, fp8_max: float = FP8_E4M3_MAX) -> torch.Tensor:
    """Saturate to +-fp8_max and round to the nearest e4m3 value (ties to even), as fp32."""
    return x.float().clamp(-fp8_max, fp8_max).to(FP8_DTYPE).float()


def round_scale(s: torch.Tensor, dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    """Round group scales to their storage dtype, keeping 8 * s_g <= fp8_max and s_g > 0.

    Returns the rounded scales as fp32 (the values the hardware sees). An all-zero group
    gets scale 1.0: its codes are 0 whatever the scale, and a positive scale keeps the
    checkpoint valid.
    """
    cap, tiny = _scale_limits(dtype, fp8_max)
    s = torch.where(s > 0, s, torch.ones_like(s)).float()
    r = s.clamp(max=cap).to(dtype).float()
    return torch.where(r > 0, r, tiny)


@functools.cache
def _scale_limits(dtype: torch.dtype, fp8_max: float) -> tuple[float, float]:
    """(largest s_g with 8 * s_g <= fp8_max, smallest positive s_g), both values of dtype, as
    Python floats (exact in fp32): round_scale's bounds, on whatever device the scales are."""
    cap = fp8_max / 8
    while float(torch.tensor(cap).to(dtype).float()) * 8 > fp8_max:  # cap must round down
        cap = math.nextafter(cap, 0.0) if dtype != FP8_DTYPE else cap * (1 - 2**-4)
    cap = float(torch.tensor(cap).to(dtype).float())
    # a scale too small for the dtype (fp8 underflow) becomes its smallest positive value
    tiny = float(torch.tensor(2.0**-9 if dtype == FP8_DTYPE else torch.finfo(dtype).tiny).to(dtype).float())
    return cap, tiny


def expand_groups(s_g: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, ceil(K/G)] group scales -> [N, K], ragged last group included."""
    return s_g.repeat_interleave(group, dim=1)[:, :k]


def compute_weight_scale(w: torch.Tensor, per_channel: bool, fp8_max: float) -> torch.Tensor:
    """Power-of-two FP8 weight scale: shape [1] (per tensor) or [N] (per channel), fp32."""
    pr = protective_range(fp8_max)
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax / pr)))


def _col(s_w: torch.Tensor) -> torch.Tensor:
    """s_w ([1] or [N]) in the shape that broadcasts against [N, K]."""
    return s_w.reshape(-1, 1)


def group_view(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/G), G], the ragged last group zero-padded (zeros never change a
    group's max, and their codes are sliced away)."""
    pad = (-x.shape[-1]) % group
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group)


def max_group_scale(groups: torch.Tensor, s_w: torch.Tensor, fp8_max: float, fp8: bool = True) -> torch.Tensor:
    """Un-rounded max-based group scales 2 * max|W8[group]| / 15 of groups [N, G', G], fp32 [N, G'].
    fp8=False skips the FP8 rounding of W / s_w (an INT4-only quantizer, FP8-unaware GPTQ)."""
    pr = protective_range(fp8_max)
    v = (groups.float() / s_w.reshape(-1, 1, 1)).clamp(-pr, pr)
    if fp8:
        v = fp8_round(v, fp8_max)
    return 2 * v.abs().amax(dim=-1) / 15


def quantize_codes(w: torch.Tensor, s_w: torch.Tensor, s_g_full: torch.Tensor) -> torch.Tensor:
    """INT4 codes (int8 storage) from the un-cast weight: one rounding. s_g_full is [N, K] or
    broadcastable (e.g. one column)."""
    s_w = s_w if s_w.ndim == w.ndim else _col(s_w)
    return torch.round(w.float() / s_w / s_g_full).clamp(INT4_MIN, INT4_MAX).to(torch.int8)


def fp8_weight(q: torch.Tensor, s_g_full: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """The FP8 weight the GEMM consumes: fp8(clamp(q * s_g)), as fp32 values."""
    return fp8_round(q.float() * s_g_full, fp8_max)


@dataclass
class QuantizedWeight:
    """One layer's quantized weight, unpacked: codes [N, K] int8, group scales [N, G'] in
    the storage dtype, weight scale [1] or [N] fp32."""

    q: torch.Tensor
    group_scale: torch.Tensor
    weight_scale: torch.Tensor
    group_size: int  # effective (K for per channel)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def fp8(self, fp8_max: float) -> torch.Tensor:
        k = self.q.shape[1]
        return fp8_weight(self.q, expand_groups(self.group_scale.float(), k, self.group_size), fp8_max)

    def dequantize(self, fp8_max: float) -> torch.Tensor:
        """W_eff = s_w * fp8(q * s_g), fp32 [N, K]."""
        return _col(self.weight_scale.float()) * self.fp8(fp8_max)


def pack_result(q: torch.Tensor, s_w: torch.Tensor, s_g: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    return QuantizedWeight(
        q=q, group_scale=s_g.to(scheme.scale_dtype), weight_scale=s_w.float(), group_size=scheme.group(q.shape[1])
    )


# ----------------------------------------------------------------------------- activations

def activation_scale(x: torch.Tensor, fp8_max: float = FP8_E4M3_MAX) -> torch.Tensor:
    """Dynamic per-token scale, [M, 1] fp32 (rows that are all zero get a tiny positive scale)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    return (amax / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None, fp8_max: float = FP8_E4M3_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """X [M, K] -> (X8 as fp32 FP8 values, scale [M, 1] or [1, 1]). Static if input_scale given."""
    s_x = activation_scale(x, fp8_max) if input_scale is None else input_scale.float().reshape(1, 1)
    return fp8_round(x.float() / s_x, fp8_max), s_x


def w4a8_matmul(
    x: torch.Tensor,
    w8: torch.Tensor,
    weight_scale: torch.Tensor,
    fp8_max: float,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    gemm_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Y = (X8 @ W8^T) in fp32 * s_x * s_w + bias, as out_dtype. w8: FP8 values (any float dtype).

    gemm_dtype=bfloat16 runs the GEMM in bf16 (exact products, fp32 accumulation, result
    rounded to bf16 before the scales): the CPU backend's numerics, ~3x faster on CPU."""
    shape = x.shape
    x8, s_x = quantize_activation(x.reshape(-1, shape[-1]), input_scale, fp8_max)
    y = (x8.to(gemm_dtype) @ w8.to(gemm_dtype).t()).float() * s_x * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*shape[:-1], -1)


def reference_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    fp8_max: float,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Ground truth W4A8 linear: FP8 x FP8 products summed in fp32, scaled, bias, out_dtype."""
    return w4a8_matmul(x, qw.fp8(fp8_max), qw.weight_scale, fp8_max, input_scale, bias, out_dtype)
