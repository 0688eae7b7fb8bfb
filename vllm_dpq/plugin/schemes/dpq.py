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

A MoE layer's experts are the same layers with an expert dimension first (``layout`` gives
the per-expert shapes, ``w4a8`` each expert's GEMM weights; vllm_dpq/plugin/moe_method.py).
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
        return self.quantizes_all(prefix, shards, "fused layer")

    def quantizes_all(self, prefix: str, names: list[str], what: str) -> bool:
        """Whether the checkpoint layers ``names``, which vLLM computes as one layer ``prefix``
        (a fused Linear's shards, a MoE layer's expert projections), are quantized: all or none."""
        ignored = [is_ignored(s, self.ignore) for s in names]
        if any(ignored) and not all(ignored):
            raise ValueError(f"DPQ checkpoint ignores {[s for s, i in zip(names, ignored) if i]} but quantizes "
                             f"the other shards of vLLM's {what} {prefix}: they must be one scheme")
        return not ignored[0]

    def layout(self, n: int, k: int, shards: int) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
        """Name -> (kind, shape, dtype) of the parameters of an [N, K] layer made of ``shards``
        checkpoint projections; kind says how vLLM shards it: "packed" (int32 along K),
        "group" ([N, groups], split along K with the codes), "channel" (one per row, whole
        over K) or "tensor" (one per shard)."""
        s = self.scheme
        out = {PACKED: ("packed", (n, packed_cols(k)), torch.int32)}
        # one group per row: its scale spans every rank's slice of K
        out[GROUP_SCALE] = ("channel", (n, 1), s.scale_dtype) if s.group_size == -1 else \
            ("group", (n, s.num_groups(k)), s.scale_dtype)
        # per tensor: one s_w per checkpoint projection (q, k, v / gate, up)
        out[WEIGHT_SCALE] = ("channel", (n,), torch.float32) if s.weight_scale == "channel" else \
            ("tensor", (shards,), torch.float32)
        if s.activation_scheme == "static":
            out[INPUT_SCALE] = ("tensor", (shards,), torch.float32)
        return out

    def create_weights(self, n, k, shards, loader):
        params = {}
        for name, (kind, shape, dtype) in self.layout(n, k, shards).items():
            if kind == "packed":
                params[name] = PackedvLLMParameter(data=torch.zeros(shape, dtype=dtype), input_dim=1, output_dim=0,
                                                   packed_dim=1, packed_factor=PACK_FACTOR, weight_loader=loader)
            elif kind == "group":
                params[name] = GroupQuantScaleParameter(data=nan_filled(*shape, dtype=dtype), output_dim=0,
                                                        input_dim=1, weight_loader=loader)
            elif kind == "channel":
                params[name] = ChannelQuantScaleParameter(data=nan_filled(*shape, dtype=dtype), output_dim=0,
                                                          weight_loader=loader)
            else:
                params[name] = PerTensorScaleParameter(data=nan_filled(*shape, dtype=dtype), weight_loader=loader)
        return params

    def check_scale(self, name, t):
        check_scale(name, t, self.scheme)

    def weights(self, layer, on_mismatch) -> W4A8Weights:
        return self.w4a8(layer.weight_packed.data, layer.weight_group_scale.data, layer.weight_scale.data,
                         layer.input_scale.data if self.scheme.activation_scheme == "static" else None,
                         layer.logical_widths, layer.input_size_per_partition, on_mismatch)

    def w4a8(self, packed: torch.Tensor, group_scale: torch.Tensor, weight_scale: torch.Tensor,
             input_scale: torch.Tensor | None, widths: list[int], k: int, on_mismatch) -> W4A8Weights:
        """One GEMM's loaded tensors (of a Linear, or of one expert's w13 / w2) as W4A8Weights:
        per-shard s_w expanded per channel, merged shards' static s_x reduced to their max."""
        s = self.scheme
        s_w = weight_scale.float()
        if s.weight_scale == "tensor" and len(widths) > 1:  # one s_w per shard -> per channel
            s_w = s_w.repeat_interleave(torch.tensor(widths, device=s_w.device))
        s_x = None
        if input_scale is not None:
            s_x = input_scale.float()
            if len(s_x) > 1 and not bool((s_x == s_x[0]).all()):
                on_mismatch("the merged projections have different static input scales %s although they share "
                            "one input; using the largest", s_x.tolist())
            s_x = s_x.max().reshape(1)
        return W4A8Weights(packed=packed, group_scale=group_scale, weight_scale=s_w, input_scale=s_x, k=k,
                           group_size=s.group(k), fp8_max=s.fp8_max)
