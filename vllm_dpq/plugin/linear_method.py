"""``DPQLinearMethod``: DPQ W4A8-FP8 linear layers inside vLLM.

What depends on how the checkpoint stores a layer (its parameters, their checks, their
conversion to ``W4A8Weights``) is the config's stored scheme (``vllm_dpq.plugin.schemes``);
this class does what every scheme shares: partition checks, detecting tensors vLLM never
loaded, backend selection, and the forward.

vLLM does not notice checkpoint tensors that are missing: every parameter records which
shards its loader filled, and scales start as NaN; ``process_weights_after_loading`` fails
naming the checkpoint tensor instead of computing with uninitialised memory.

Known difference under tensor parallelism: a row-parallel layer's dynamic per-token s_x is
taken over each rank's slice of K (finer than over the whole row), so TP > 1 with dynamic
activations is not bit-identical to TP = 1. Static s_x is identical.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import PerTensorScaleParameter

from vllm_dpq.format import GROUP_SCALE, PACKED, CheckpointError
from vllm_dpq.kernels import ENV_BACKEND, Backend, W4A8Weights, select_backend
from vllm_dpq.kernels.cpu import ENV_GEMM, native_bf16, kernels as cpu_kernels
from vllm_dpq.packing import PACK_FACTOR
from vllm_dpq.plugin import share_vllm_log_handlers

logger = logging.getLogger("vllm_dpq.plugin")
_announced: set[str] = set()  # log each backend choice / warning kind once per process

_QKV = {"q": 0, "k": 1, "v": 2}


def check_partition(prefix: str, input_size: int, k_per_rank: int, group_size: int) -> None:
    """Row-parallel layers split K over ranks: each slice must hold whole int32 words and
    whole groups. (A ragged last group or K % 8 != 0 is fine when K is not split.)"""
    if k_per_rank == input_size:
        return
    tp = input_size // k_per_rank
    if k_per_rank % PACK_FACTOR or (group_size != -1 and k_per_rank % group_size):
        raise ValueError(
            f"DPQ layer {prefix}: K={input_size} split over tensor-parallel size {tp} gives "
            f"{k_per_rank} input columns per rank, which must be a multiple of {PACK_FACTOR} (INT4 "
            f"packing) and of the group size {group_size}. Use a checkpoint quantized with a "
            f"group size that divides {k_per_rank} (e.g. 32 or 64), or tensor-parallel size 1."
        )


def _track_loads(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Wrap param's weight_loader to record the shard ids it was called with (None = whole)."""
    inner = param.weight_loader
    param.dpq_loaded = []

    def load(p, loaded_weight, *args, **kwargs):
        out = inner(p, loaded_weight, *args, **kwargs)
        p.dpq_loaded.append(args[0] if args else kwargs.get("loaded_shard_id"))
        return out

    param.weight_loader = load
    return param


def _loaded_shards(param, n_shards: int) -> set[int]:
    done: set[int] = set()
    for shard in param.dpq_loaded:
        if shard is None:
            return set(range(n_shards))
        for s in shard if isinstance(shard, tuple) else (shard,):
            done.add(_QKV.get(s, s))
    return done


def announce(key: str, level: int, msg: str, *args) -> None:
    """Log once per process per key, in vLLM's log."""
    if key not in _announced:
        _announced.add(key)
        share_vllm_log_handlers()
        logger.log(level, msg, *args)


def mismatch_warner(prefix: str):
    """on_mismatch for StoredScheme.weights: each kind of mismatch is warned once per process."""
    def warn_once(msg, *args):
        announce(f"mismatch:{msg}", logging.WARNING, "DPQ: %s: " + msg + " (warned once)", prefix, *args)
    return warn_once


def prepare_backend(weights: W4A8Weights, device: torch.device) -> tuple[Backend, Any]:
    """Select the backend for one GEMM's weights and prepare its state (the choice is logged once)."""
    backend = select_backend(weights, device)
    announce(f"backend:{backend.name}", logging.INFO, "DPQ: using backend %s (%s to override)", backend.name,
             ENV_BACKEND)
    state = backend.prepare(weights)
    if backend.name == "cpu":
        ops = cpu_kernels()
        announce("cpu:gemm", logging.INFO, "DPQ: CPU kernel %s, GEMMs in %s (%s; %s to override)",
                 ops.isa() if ops is not None else "unavailable (torch fallback)", state.gemm_dtype,
                 "native bf16" if native_bf16() else "this CPU has no native bf16", ENV_GEMM)
    return backend, state


def free_weight_data(layer: torch.nn.Module, names) -> None:
    """Empty the named parameters (a backend that keeps its own copy of the weights needs none)."""
    for name in names:
        param = getattr(layer, name, None)  # a compressed-tensors import has no group scale param
        if param is not None:
            param.data = param.data.new_empty((0,))


class DPQLinearMethod(LinearMethodBase):
    def __init__(self, quant_config, prefix: str = ""):
        self.quant_config = quant_config
        self.stored = quant_config.stored
        self.prefix = prefix

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        k, n = input_size_per_partition, sum(output_partition_sizes)
        check_partition(self.prefix, input_size, k, self.stored.scheme.group_size)
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = k
        params = self.stored.create_weights(n, k, len(output_partition_sizes), extra_weight_attrs["weight_loader"])
        for name, p in params.items():
            layer.register_parameter(name, _track_loads(p))

    # ------------------------------------------------------------------ load end

    def _shard_prefixes(self, n_shards: int) -> list[str]:
        """Checkpoint prefix of each shard: model.layers.0.self_attn.qkv_proj -> ...q_proj, ..."""
        head, _, proj = self.prefix.rpartition(".")
        names = self.quant_config.packed_modules_mapping.get(proj, [])
        if len(names) == n_shards and n_shards > 1:
            return [f"{head}.{x}" if head else x for x in names]
        return [self.prefix] if n_shards == 1 else [f"{self.prefix}[shard {i}]" for i in range(n_shards)]

    def _validate(self, layer) -> None:
        widths = layer.logical_widths
        shard_names = self._shard_prefixes(len(widths))
        for name, p in layer.named_parameters(recurse=False):
            if not hasattr(p, "dpq_loaded"):
                continue
            missing = sorted(set(range(len(widths))) - _loaded_shards(p, len(widths)))
            if missing:
                raise CheckpointError(
                    f"tensor {shard_names[missing[0]]}.{name} missing from the checkpoint "
                    f"(never loaded into vLLM layer {self.prefix})")
            if not p.data.is_floating_point():  # codes and shapes; scales are checked below
                continue
            # one entry per shard (per-tensor scales) or one row per output channel
            pieces = p.data.split(1 if isinstance(p, PerTensorScaleParameter) else widths)
            for shard_name, piece in zip(shard_names, pieces):
                try:
                    self.stored.check_scale(f"{shard_name}.{name}", piece)
                except CheckpointError as e:
                    raise CheckpointError(f"{e} (missing from the checkpoint or invalid)") from None

    def process_weights_after_loading(self, layer) -> None:
        self._validate(layer)
        weights = self.stored.weights(layer, mismatch_warner(self.prefix))
        backend, state = prepare_backend(weights, layer.weight_packed.device)
        layer._dpq_backend = backend
        layer._dpq_state = state
        if not backend.keeps_packed(state):  # the backend made its own copy: free ours
            free_weight_data(layer, (PACKED, GROUP_SCALE))
            weights = weights.without_weight_data()
        layer._dpq_weights = weights  # what the backend was given (minus freed data), for tests

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer._dpq_backend.apply(layer._dpq_state, x, bias)


register_weight_loader_v2_supported_method(DPQLinearMethod)
