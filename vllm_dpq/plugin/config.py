"""``DPQQuantConfig``: the checkpoint's ``quantization_config`` as a vLLM QuantizationConfig."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_dpq.format import QUANT_METHOD, DPQConfig
from vllm_dpq.interop.ct_format import CT_METHOD, is_compressed_tensors_config
from vllm_dpq.plugin.schemes import CompressedTensorsW4A8Scheme, DPQScheme, StoredScheme


@register_quantization_config(QUANT_METHOD)
class DPQQuantConfig(QuantizationConfig):
    def __init__(self, stored: StoredScheme):
        super().__init__()
        self.stored = stored
        self.dpq = stored.dpq
        self.scheme = stored.scheme

    def __repr__(self) -> str:
        return f"DPQQuantConfig({type(self.stored).__name__}, {self.scheme}, ignore={self.dpq.ignore})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]  # fp32: the fast dtype of CPUs without bf16

    @classmethod
    def get_min_capability(cls) -> int:
        return 89  # FP8 tensor cores (Ada, Hopper, Blackwell); not checked on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DPQQuantConfig":
        """The stored scheme, chosen once: a compressed-tensors W4A8-FP8 checkpoint (only reached
        with --quantization dpq) or a DPQ checkpoint (CheckpointError names what is wrong)."""
        if is_compressed_tensors_config(config):
            return cls(CompressedTensorsW4A8Scheme(config))
        return cls(DPQScheme(DPQConfig.from_dict(config)))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim DPQ checkpoints only (and only when the user asked for nothing else).
        A compressed-tensors checkpoint is claimed only when the user asked for
        ``--quantization dpq``; otherwise it goes to stock vLLM as always."""
        if not isinstance(hf_quant_cfg, dict):
            return None
        method = hf_quant_cfg.get("quant_method")
        if method == QUANT_METHOD:
            return QUANT_METHOD if user_quant in (None, QUANT_METHOD) else None
        if method == CT_METHOD and user_quant == QUANT_METHOD:  # from_config says if it is not W4A8-FP8
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.stored.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        from vllm_dpq.plugin.linear_method import DPQLinearMethod

        if isinstance(layer, RoutedExperts):  # a fused-MoE layer's routed experts
            from vllm_dpq.plugin.moe_method import moe_quant_method

            return moe_quant_method(self, layer, prefix)
        quantized = self.stored.quantizes(layer, prefix, self.packed_modules_mapping)
        if not isinstance(layer, LinearBase):
            return None
        return DPQLinearMethod(self, prefix) if quantized else UnquantizedLinearMethod()
