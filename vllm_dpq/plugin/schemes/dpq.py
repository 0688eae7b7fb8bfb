"""Native DPQ checkpoints (docs/FORMAT.md), loaded by vLLM's own sharding loaders:

    weight_packed       int32 [N, ceil(K/8)]   PackedvLLMParameter (8 codes per int32 along K)
    weight_group_scale  bf16/fp8 [N, ceil(K/G)] GroupQuantScaleParameter ([N, 1] per-channel
                                               group, replicated over tensor-parallel ranks)
    weight_scale        fp32 [N] per channel   ChannelQuantScaleParameter
                        fp32 [shards] per tensor  PerTensorScaleParameter: one s_w per checkpoint
                                               projection (q, k, v / gate, up)
    input_scale         fp32 [shards]          static activations only

At load end, per-tensor s_w of a merged layer becomes per-channel [N] (exact: each shard's rows
keep their own s_w). The shards of a merged layer share one input, so their static s_x should
be equal; if calibration measured different values the largest is used (no clipping).
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter, PerTensorScaleParameter,
)

from vllm_dpq.format import GROUP_SCALE, INPUT_SCALE, PACKED, WEIGHT_SCALE, DPQConfig, check_scale, is_ignored
from vllm_dpq.kernels import W4A8Weights
from vllm_dpq.packing import PACK_FACTOR, packed_cols
from vllm_dpq.plugin.schemes.base import StoredScheme, nan_filled


class DPQScheme(StoredScheme):
    def __init__(self, dpq: DPQConfig):
        self.dpq, self.scheme, self.ignore = dpq, dpq.scheme, list(dpq.ignore)

    def apply_vllm_mapper(self, mapper) -> None:
        self.ignore = mapper.apply_list(self.ignore)

    def quantizes(self, layer, prefix, packed_modules_mapping) -> bool:
        """Not ignored, and not the LM head (calibration quantizes decoder layers only). A fused
        vLLM layer (qkv_proj) is quantized when its checkpoint shards (q/k/v_proj) are; shards
        that disagree cannot be one GEMM and are refused."""
        if "lm_head" in prefix:
            return False
        head, _, proj = prefix.rpartition(".")
        shards = [f"{head}.{s}" if head else s for s in packed_modules_mapping.get(proj, [])] or [prefix]
        ignored = [is_ignored(s, self.ignore) for s in shards]
        if any(ignored) and not all(ignored):
            raise ValueError(f"DPQ checkpoint ignores {[s for s, i in zip(shards, ignored) if i]} but quantizes "
                             f"the other shards of vLLM's fused layer {prefix}: they must be one scheme")
        return not ignored[0]

    def create_weights(self, n, k, shards, loader):
        s = self.scheme
        params = {PACKED: PackedvLLMParameter(data=torch.zeros(n, packed_cols(k), dtype=torch.int32), input_dim=1,
                                              output_dim=0, packed_dim=1, packed_factor=PACK_FACTOR,
                                              weight_loader=loader)}
        if s.group_size == -1:  # one group per row: its scale spans every rank's slice of K
            params[GROUP_SCALE] = ChannelQuantScaleParameter(data=nan_filled(n, 1, dtype=s.scale_dtype),
                                                             output_dim=0, weight_loader=loader)
        else:
            params[GROUP_SCALE] = GroupQuantScaleParameter(data=nan_filled(n, s.num_groups(k), dtype=s.scale_dtype),
                                                           output_dim=0, input_dim=1, weight_loader=loader)
        if s.weight_scale == "channel":
            params[WEIGHT_SCALE] = ChannelQuantScaleParameter(data=nan_filled(n), output_dim=0, weight_loader=loader)
        else:  # one s_w per checkpoint projection (q, k, v / gate, up)
            params[WEIGHT_SCALE] = PerTensorScaleParameter(data=nan_filled(shards), weight_loader=loader)
        if s.activation_scheme == "static":
            params[INPUT_SCALE] = PerTensorScaleParameter(data=nan_filled(shards), weight_loader=loader)
        return params

    def check_scale(self, name, t):
        check_scale(name, t, self.scheme)

    def weights(self, layer, on_mismatch) -> W4A8Weights:
        s, widths, k = self.scheme, layer.logical_widths, layer.input_size_per_partition
        s_w = layer.weight_scale.data.float()
        if s.weight_scale == "tensor" and len(widths) > 1:  # one s_w per shard -> per channel
            s_w = s_w.repeat_interleave(torch.tensor(widths, device=s_w.device))
        s_x = None
        if s.activation_scheme == "static":
            s_x = layer.input_scale.data.float()
            if len(s_x) > 1 and not bool((s_x == s_x[0]).all()):
                on_mismatch("the merged projections have different static input scales %s although they share "
                            "one input; using the largest", s_x.tolist())
            s_x = s_x.max().reshape(1)
        return W4A8Weights(packed=layer.weight_packed.data, group_scale=layer.weight_group_scale.data,
                           weight_scale=s_w, input_scale=s_x, k=k, group_size=s.group(k), fp8_max=s.fp8_max)
