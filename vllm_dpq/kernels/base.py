"""What every backend receives and implements."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from vllm_dpq.numerics import expand_groups, fp8_weight, quantize_activation
from vllm_dpq.packing import unpack_int4


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
