"""``DPQQuantConfig``: the checkpoint's ``quantization_config`` as a vLLM QuantizationConfig."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_dpq.format import QUANT_METHOD, DPQConfig


@register_quantization_config(QUANT_METHOD)
class DPQQuantConfig(QuantizationConfig):
    def __init__(self, dpq: DPQConfig, ct=None):
        super().__init__()
        self.dpq = dpq
        self.scheme = dpq.scheme
        self.ignore = list(dpq.ignore)
        # --- compressed-tensors import (vllm_dpq.interop): vLLM's CompressedTensorsConfig of the
        # checkpoint, used for its layer matching only; None for DPQ checkpoints
        self.ct = ct

    def __repr__(self) -> str:
        return f"DPQQuantConfig({self.scheme}, ignore={self.ignore})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 89  # FP8 tensor cores (Ada, Hopper, Blackwell); not checked on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DPQQuantConfig":
        # --- compressed-tensors import (vllm_dpq.interop): only reached with --quantization dpq
        if isinstance(config, dict) and config.get("quant_method") == "compressed-tensors":
            from vllm_dpq.interop.compressed_tensors import dpq_config_from_compressed_tensors, vllm_ct_config

            return cls(dpq_config_from_compressed_tensors(config), ct=vllm_ct_config(config))
        # ---
        return cls(DPQConfig.from_dict(config))  # CheckpointError names what is wrong

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim DPQ checkpoints only (and only when the user asked for nothing else).
        A compressed-tensors checkpoint is claimed only when the user asked for
        ``--quantization dpq``; otherwise it goes to stock vLLM as always."""
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            return QUANT_METHOD if user_quant in (None, QUANT_METHOD) else None
        # --- compressed-tensors import (vllm_dpq.interop); from_config says if it is not W4A8-FP8
        if (user_quant == QUANT_METHOD and isinstance(hf_quant_cfg, dict)
                and hf_quant_cfg.get("quant_method") == "compressed-tensors"):
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.ignore = hf_to_vllm_mapper.apply_list(self.ignore)
        if self.ct is not None:  # compressed-tensors import: map its targets and ignore list too
            self.ct.apply_vllm_mapper(hf_to_vllm_mapper)

    def is_skipped(self, prefix: str) -> bool:
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

        return "lm_head" in prefix or is_layer_skipped(prefix, self.ignore, self.packed_modules_mapping)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if self.ct is not None:  # compressed-tensors import: its targets / ignore, matched by vLLM
            from vllm_dpq.interop.compressed_tensors import ct_layer_quantized

            quantized = ct_layer_quantized(self.ct, self.packed_modules_mapping, layer, prefix)
            if not isinstance(layer, LinearBase):
                return None
            if not quantized:
                return UnquantizedLinearMethod()
        elif not isinstance(layer, LinearBase):
            return None
        elif self.is_skipped(prefix):
            return UnquantizedLinearMethod()
        from vllm_dpq.plugin.linear_method import DPQLinearMethod

        return DPQLinearMethod(self, prefix)
