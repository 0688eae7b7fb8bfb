"""compressed-tensors W4A8-FP8 checkpoints served with ``--quantization dpq`` (docs/INTEROP.md).

The checkpoint's own tensors (``weight_packed``, bf16 ``weight_scale`` S [N, ceil(K/G)] or
[N, 1] per channel, ``weight_shape``) are loaded as vLLM parameters and converted at load end
by stock vLLM's fold, on this rank's slice as stock vLLM does: s_g = s8, s_w = chan
(``vllm_dpq.interop.fold.ct_scales_to_dpq``), so the weights equal stock vLLM's H100 weights.
Layer selection is compressed-tensors' own (targets, ignore, regexes, fused shards), matched
by vLLM's ``CompressedTensorsConfig``, so exactly the layers stock vLLM would quantize are.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter, ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter,
)

from vllm_dpq.format import check_scale
from vllm_dpq.interop.ct_format import CT_PACKED, CT_SCALE, CT_SHAPE, dpq_config_from_compressed_tensors
from vllm_dpq.interop.fold import ct_scales_to_dpq
from vllm_dpq.kernels import W4A8Weights
from vllm_dpq.numerics import FP8_E4M3_MAX
from vllm_dpq.packing import PACK_FACTOR, packed_cols
from vllm_dpq.plugin.schemes.base import StoredScheme, nan_filled


class CompressedTensorsW4A8Scheme(StoredScheme):
    def __init__(self, cfg: Mapping[str, Any]):
        self.dpq = dpq_config_from_compressed_tensors(cfg)  # InteropError naming what is not W4A8-FP8
        self.scheme = self.dpq.scheme
        self.ct = CompressedTensorsConfig.from_config(copy.deepcopy(dict(cfg)))

    def apply_vllm_mapper(self, mapper) -> None:
        self.ct.apply_vllm_mapper(mapper)

    def quantizes(self, layer, prefix, packed_modules_mapping) -> bool:
        """Non-linear layers that the config would quantize (embeddings, lm_head) are refused."""
        self.ct.packed_modules_mapping = packed_modules_mapping
        scheme = self.ct.get_scheme_dict(layer, prefix)
        quantized = bool(scheme and scheme.get("weights") is not None)
        if quantized and not isinstance(layer, LinearBase):
            raise NotImplementedError(f"--quantization dpq: compressed-tensors quantizes {prefix} "
                                      f"({type(layer).__name__}); only Linear layers are supported")
        return quantized

    def create_weights(self, n, k, shards, loader):
        """weight_scale is held in fp32 (exact for bf16/fp16 checkpoints), NaN until loaded."""
        if self.scheme.group_size == -1:
            scale = ChannelQuantScaleParameter(data=nan_filled(n, 1), output_dim=0, weight_loader=loader)
        else:
            scale = GroupQuantScaleParameter(data=nan_filled(n, self.scheme.num_groups(k)), output_dim=0,
                                             input_dim=1, weight_loader=loader)
        return {
            CT_PACKED: PackedvLLMParameter(data=torch.zeros(n, packed_cols(k), dtype=torch.int32), input_dim=1,
                                           output_dim=0, packed_dim=1, packed_factor=PACK_FACTOR,
                                           weight_loader=loader),
            CT_SCALE: scale,
            # [N, K] of the checkpoint projection; stock vLLM ignores it too
            CT_SHAPE: BasevLLMParameter(data=torch.zeros(2, dtype=torch.int64), weight_loader=loader),
        }

    def check_scale(self, name, t):
        check_scale(name, t)  # S is any finite positive value; the fold makes DPQ scales of it

    def weights(self, layer, on_mismatch) -> W4A8Weights:
        k = layer.input_size_per_partition
        s8, chan = ct_scales_to_dpq(layer.weight_scale.data, self.scheme.group_size == -1)
        layer.weight_group_scale_fp8, layer.weight_chan_scale = s8, chan  # for inspection and tests
        return W4A8Weights(packed=layer.weight_packed.data, group_scale=s8, weight_scale=chan, input_scale=None,
                           k=k, group_size=self.scheme.group(k), fp8_max=FP8_E4M3_MAX)
