"""What every backend receives and implements."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from vllm_dpq.numerics import SCALE_DTYPES, expand_groups, fp8_weight, quantize_activation
from vllm_dpq.packing import packed_cols, unpack_int4


@dataclass
class W4A8Weights:
    """One layer's quantized weights in checkpoint layout (see docs/FORMAT.md)."""

    packed: torch.Tensor  # int32 [N, ceil(K/8)]
    group_scale: torch.Tensor  # bf16 or fp8 [N, ceil(K/G)]
    weight_scale: torch.Tensor  # fp32 [1] or [N]
    input_scale: torch.Tensor | None  # fp32 [1] (static) or None (dynamic per token)
    k: int
    group_size: int  # effective: K for per-channel
    fp8_max: float = 448.0

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    def check(self) -> None:
        """The layout every backend relies on (ValueError otherwise); values are the loader's
        business (vllm_dpq.format.check_scale)."""
        n, k = self.n, self.k
        if self.group_size <= 0:
            raise ValueError(f"effective group size must be positive, got {self.group_size}")
        if tuple(self.packed.shape) != (n, packed_cols(k)) or self.packed.dtype != torch.int32:
            raise ValueError(f"packed weight must be int32 [{n}, {packed_cols(k)}], got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        groups = -(-k // self.group_size)
        if tuple(self.group_scale.shape) != (n, groups):
            raise ValueError(f"group scales must be [{n}, {groups}], got {tuple(self.group_scale.shape)}")
        if self.group_scale.dtype not in SCALE_DTYPES.values():
            raise ValueError(f"group scales must be one of {sorted(SCALE_DTYPES)}, got {self.group_scale.dtype}")
        if self.weight_scale.numel() not in (1, n):
            raise ValueError(f"weight scale must have 1 or {n} elements, got {self.weight_scale.numel()}")
        if self.input_scale is not None and self.input_scale.numel() != 1:
            raise ValueError(f"input scale must have 1 element, got {self.input_scale.numel()}")

    def fp8_values(self) -> torch.Tensor:
        """fp8(clamp(q * s_g)) as fp32 [N, K]: the B operand of the FP8 GEMM."""
        q = unpack_int4(self.packed, self.k)
        return fp8_weight(q, expand_groups(self.group_scale.float(), self.k, self.group_size), self.fp8_max)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activation(x, self.input_scale, self.fp8_max)

    def without_weight_data(self) -> "W4A8Weights":
        """The same layer description, holding no reference to the packed codes and group
        scales (for backends that keep their own copy in another layout)."""
        return replace(self, packed=self.packed.new_empty((self.n, 0)), group_scale=self.group_scale.new_empty((self.n, 0)))


class Backend:
    name = "base"

    def unsupported(self, w: W4A8Weights, device: torch.device) -> str | None:
        """None if this backend computes w exactly on device, else the reason why not."""
        raise NotImplementedError

    def prepare(self, w: W4A8Weights) -> Any:
        """Load-time layout work; the result is passed back to apply()."""
        raise NotImplementedError

    def keeps_packed(self, state: Any) -> bool:
        """Whether state still uses w.packed / w.group_scale (else the caller may free them)."""
        return False

    def apply(self, state: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] (bf16/fp16/fp32) -> y [..., N] in x's dtype."""
        raise NotImplementedError
