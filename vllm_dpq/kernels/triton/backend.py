"""``TritonBackend`` (the dispatch interface) and the one torch custom op it calls.

vLLM compiles the model with ``torch.compile(fullgraph=True)``: Dynamo must not trace into
the Triton launches and caches of ``ops.linear``, so ``apply`` goes through one opaque custom
op, ``vllm_dpq::triton_linear``, registered at import (needs no triton). Everything the op
needs is an argument: the resident tensors, the layer's sizes, and the settings ``prepare``
resolved from the environment (the config override as a list of ints, the dequant threshold,
the two rounding choices), so the op reads no environment either.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.kernels.triton.config import TritonConfig, TritonSettings
from vllm_dpq.kernels.triton.ops import TritonState, linear, prepare_weights, triton_import_error
from vllm_dpq.numerics import FP8_DTYPE

MIN_CAPABILITY = (8, 9)
OP_NAME = "vllm_dpq::triton_linear"


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
        """Re-lay the weight and resolve the environment (DPQ_TRITON_*) once, here."""
        return prepare_weights(w)

    def apply(self, state: TritonState, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if _LINEAR_OP is None:  # a torch without torch.library.custom_op
            return linear(state, x, bias)
        s = state.settings
        return _LINEAR_OP(x, state.qweight, state.scales, state.weight_scale, state.weight_scale_padded,
                          state.input_scale, bias, state.n, state.k, state.group_size, state.fp8_max,
                          None if s.config is None else s.config.to_ints(), s.dequant_m, s.emulate_act_rne,
                          s.emulate_weight_rne)


def _linear_op_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, weight_scale: torch.Tensor,
                    weight_scale_padded: torch.Tensor, input_scale: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], n: int, k: int, group_size: int, fp8_max: float,
                    config: Optional[List[int]], dequant_m: int, emulate_act_rne: bool,
                    emulate_weight_rne: bool) -> torch.Tensor:
    settings = TritonSettings(None if config is None else TritonConfig.from_ints(config), dequant_m,
                              emulate_act_rne, emulate_weight_rne)
    state = TritonState(qweight, scales, weight_scale, input_scale, n, k, group_size, fp8_max, weight_scale_padded,
                        settings)
    y = linear(state, x, bias)
    return y if y.is_contiguous() else y.contiguous()


def _linear_op_fake(x, qweight, scales, weight_scale, weight_scale_padded, input_scale, bias, n, k, group_size,
                    fp8_max, config, dequant_m, emulate_act_rne, emulate_weight_rne):
    return x.new_empty((*x.shape[:-1], n))


def _register_linear_op():
    if not hasattr(torch.library, "custom_op"):
        return None
    try:
        op = torch.library.custom_op(OP_NAME, mutates_args=())(_linear_op_impl)
        op.register_fake(_linear_op_fake)
        return op
    except Exception:  # registered already (module re-executed), or an older torch.library
        namespace, name = OP_NAME.split("::")
        ns = getattr(torch.ops, namespace, None)
        return getattr(ns, name, None) if ns is not None else None


_LINEAR_OP = _register_linear_op()
