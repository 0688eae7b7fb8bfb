"""CPU backend: exact W4A8 emulation.

Every FP8 value, and every product of two FP8 values, is exact in bf16 and in fp32, so a GEMM
in either dtype (fp32 accumulation) over FP8-rounded operands computes the FP8 GEMM. The GEMM
dtype is chosen at load from the CPU ($VLLM_DPQ_CPU_GEMM=auto): bf16 where the CPU computes it
natively (AVX512-BF16, AMX; the result is then rounded to bf16 before the scales, at most one
bf16 ulp from the reference), fp32 elsewhere (AVX2 only: there a bf16 matmul is ~40x slower
than fp32). Activations may be bf16, fp16 or fp32; the output has their dtype.

Weight residency ($VLLM_DPQ_CPU_WEIGHTS):
  int4  (default) packed INT4 stays resident; FP8 weights are rebuilt on every call.
  fp8   FP8 weights cached as float8_e4m3fn (1 byte/weight), upcast each call.
  bf16  FP8 values cached in bf16 (2 bytes/weight, the fastest on CPUs without FP8 GEMM).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.numerics import FP8_DTYPE, w4a8_matmul

ENV_WEIGHTS = "VLLM_DPQ_CPU_WEIGHTS"
MODES = ("int4", "fp8", "bf16")
ENV_GEMM = "VLLM_DPQ_CPU_GEMM"
GEMM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX tiles)?"""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively (CUDA; CPUs with AVX512-BF16 or AMX), else
    fp32: the one rule behind the CPU GEMM dtype, --calib-dtype auto and the CPU serving dtype."""
    return torch.bfloat16 if torch.device(device).type == "cuda" or native_bf16() else torch.float32


def gemm_dtype() -> torch.dtype:
    """The CPU GEMM dtype: $VLLM_DPQ_CPU_GEMM (auto, bfloat16, float32); auto = fast_dtype()."""
    choice = os.environ.get(ENV_GEMM, "auto")
    if choice == "auto":
        return fast_dtype()
    if choice not in GEMM_DTYPES:
        raise ValueError(f"{ENV_GEMM}={choice!r}: choose auto or one of {sorted(GEMM_DTYPES)}")
    return GEMM_DTYPES[choice]


def weight_mode() -> str:
    mode = os.environ.get(ENV_WEIGHTS, "int4")
    if mode not in MODES:
        raise ValueError(f"{ENV_WEIGHTS}={mode!r}: choose one of {MODES}")
    return mode


@dataclass
class CpuState:
    mode: str  # weight residency, $VLLM_DPQ_CPU_WEIGHTS
    gemm_dtype: torch.dtype
    weights: W4A8Weights  # without its packed data when a cache holds the FP8 values
    cache: torch.Tensor | None = None  # FP8 values [N, K] as float8_e4m3fn or bf16


class CpuBackend(Backend):
    name = "cpu"

    def unsupported(self, w, device):
        return None if device.type == "cpu" else f"runs on CPU only, not {device.type}"

    def prepare(self, w: W4A8Weights) -> CpuState:
        mode, dtype = weight_mode(), gemm_dtype()
        if mode == "int4":
            return CpuState(mode, dtype, w)
        w8 = w.fp8_values()
        return CpuState(mode, dtype, w.without_weight_data(),
                        w8.to(FP8_DTYPE) if mode == "fp8" else w8.to(torch.bfloat16))

    def keeps_packed(self, state: CpuState):
        return state.mode == "int4"

    def apply(self, state: CpuState, x, bias=None):
        w = state.weights
        w8 = w.fp8_values() if state.cache is None else state.cache
        return w4a8_matmul(x, w8, w.weight_scale, w.fp8_max, w.input_scale, bias, x.dtype, state.gemm_dtype)
