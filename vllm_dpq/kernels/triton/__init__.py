"""Triton backend: fused W4A8-FP8 GEMM for NVIDIA GPUs of compute capability >= 8.9
(Ada SM89, Hopper SM90, Blackwell SM100/SM120). Importable with torch alone: Triton is
imported lazily, the first time a kernel is launched.

One idea per module:

* ``jit``: the @triton.jit kernels (activation quantization, weight-tile dequantization,
  the fused GEMM, the split-K reduction) and how they round to FP8. Imports triton; only
  ``ops.kernels()`` imports it, on first use.
* ``config``: ``TritonConfig``, the table by M (``pick_config``), and the environment
  (DPQ_TRITON_CONFIG, DPQ_TRITON_DEQUANT_M, DPQ_TRITON_RNE), parsed and
  validated once per layer into ``TritonSettings``.
* ``ops``: the resident layout (``prepare_weights`` -> ``TritonState``, which carries the
  settings) and the launchers (``quantize_activation_fp8``, ``dequantize_weight``, ``gemm``,
  ``linear_dequant``, ``linear``).
* ``backend``: ``TritonBackend`` and the torch custom op it calls (opaque to torch.compile).

    state = TritonBackend().prepare(weights)     # re-layout + environment, once
    y = TritonBackend().apply(state, x, bias)    # one custom op per call
"""

from vllm_dpq.kernels.triton.backend import MIN_CAPABILITY, OP_NAME, TritonBackend
from vllm_dpq.kernels.triton.config import (
    CONFIG_TABLE,
    DEFAULT_DEQUANT_M,
    ENV_CONFIG,
    ENV_DEQUANT_M,
    ENV_RNE,
    SPLIT_K_CHOICES,
    TritonConfig,
    TritonSettings,
    interpreting,
    parse_config,
    parse_dequant_m,
    pick_config,
    rne_modes,
)
from vllm_dpq.kernels.triton.ops import (
    TritonState,
    dequantize_weight,
    gemm,
    kernels,
    linear,
    linear_dequant,
    num_sms,
    prepare_weights,
    quantize_activation_fp8,
    triton_import_error,
)

__all__ = ["TritonBackend", "TritonConfig", "TritonSettings", "TritonState", "pick_config", "prepare_weights",
           "quantize_activation_fp8", "dequantize_weight", "gemm", "linear", "linear_dequant", "kernels", "num_sms",
           "interpreting", "rne_modes", "parse_config", "parse_dequant_m", "triton_import_error", "CONFIG_TABLE",
           "DEFAULT_DEQUANT_M", "ENV_CONFIG", "ENV_DEQUANT_M", "ENV_RNE", "SPLIT_K_CHOICES", "MIN_CAPABILITY",
           "OP_NAME"]
