"""CPU backend: exact W4A8 emulation.

Every FP8 value, and every product of two FP8 values, is exact in bf16/fp32, so a bf16 GEMM
(fp32 accumulation inside oneDNN) over FP8-rounded operands computes the FP8 GEMM. The one
difference from an FP8 tensor core: the GEMM result is rounded to bf16 before the scales are
applied (at most one bf16 ulp; the reference applies scales in fp32).

Weight residency ($VLLM_DPQ_CPU_WEIGHTS):
  int4  (default) packed INT4 stays resident; FP8 weights are rebuilt on every call.
  fp8   FP8 weights cached as float8_e4m3fn (1 byte/weight), upcast each call.
  bf16  FP8 values cached in bf16 (2 bytes/weight, the fastest on CPUs without FP8 GEMM).
"""

from __future__ import annotations

import os

import torch

from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.numerics import FP8_DTYPE, w4a8_matmul

ENV_WEIGHTS = "VLLM_DPQ_CPU_WEIGHTS"
MODES = ("int4", "fp8", "bf16")


def weight_mode() -> str:
    mode = os.environ.get(ENV_WEIGHTS, "int4")
    if mode not in MODES:
        raise ValueError(f"{ENV_WEIGHTS}={mode!r}: choose one of {MODES}")
    return mode


class CpuBackend(Backend):
    name = "cpu"

    def unsupported(self, w, device):
        return None if device.type == "cpu" else f"runs on CPU only, not {device.type}"

    def prepare(self, w: W4A8Weights):
        mode = weight_mode()
        if mode == "int4":
            return (mode, w)
        w8 = w.fp8_values()
        return (mode, w.without_weight_data(), w8.to(FP8_DTYPE) if mode == "fp8" else w8.to(torch.bfloat16))

    def keeps_packed(self, state):
        return state[0] == "int4"

    def apply(self, state, x, bias=None):
        mode, w = state[0], state[1]
        w8 = w.fp8_values() if mode == "int4" else state[2]
        return w4a8_matmul(x, w8, w.weight_scale, w.fp8_max, w.input_scale, bias, x.dtype, torch.bfloat16)
