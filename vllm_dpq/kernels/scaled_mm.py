"""torch._scaled_mm backend: FP8 weights cached at load, one FP8 GEMM per call.

Works on CPU (slow there: no FP8 units) and on FP8-capable NVIDIA GPUs (SM89+). Rowwise
scaling: s_x per token [M, 1] (static s_x broadcast), s_w per channel [1, N].
cuBLASLt needs K and N multiples of 16: the weight is zero-padded at load, x along K per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.numerics import FP8_DTYPE


def _fp8_capable(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


class ScaledMMBackend(Backend):
    name = "scaled_mm"
    align = 16

    def unsupported(self, w, device):
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no _scaled_mm"
        if not _fp8_capable(device):
            return f"{device} has no FP8 GEMM (needs CPU or an NVIDIA GPU of compute capability >= 8.9)"
        return None

    def prepare(self, w: W4A8Weights):
        w8 = w.fp8_values()
        pad_k, pad_n = (-w.k) % self.align, (-w.n) % self.align
        w8 = F.pad(w8, (0, pad_k, 0, pad_n)).to(FP8_DTYPE)
        s_w = F.pad(w.weight_scale.float().expand(w.n), (0, pad_n), value=1.0).reshape(1, -1).contiguous()
        return w.without_weight_data(), w8, s_w, pad_k, pad_n

    def apply(self, state, x, bias=None):
        w, w8, s_w, pad_k, pad_n = state
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x8, s_x = w.quantize_input(x2)
        x8 = F.pad(x8, (0, pad_k)).to(FP8_DTYPE)
        s_x = s_x.expand(x2.shape[0], 1).contiguous()
        if bias is not None and pad_n:
            bias = F.pad(bias, (0, pad_n))
        y = torch._scaled_mm(x8, w8.t(), scale_a=s_x, scale_b=s_w, out_dtype=torch.bfloat16,
                             bias=None if bias is None else bias.to(torch.bfloat16))[:, : w.n]
        return y.to(x.dtype).reshape(*shape[:-1], w.n)
