"""``DPQMoEMethod``: DPQ W4A8-FP8 routed experts of vLLM's fused-MoE layers.

A checkpoint stores every expert's projections as ordinary DPQ layers (docs/FORMAT.md,
``...experts.<e>.{gate,up,down}_proj.*``; Mixtral ``w1, w3, w2``). vLLM's expert weight loader
(``RoutedExperts.weight_loader``) fills them into one parameter per tensor kind and
projection group, with the expert as the first dimension:

    w13_weight_packed      int32 [E, 2I, ceil(H/8)]     gate rows, then up rows
    w13_weight_group_scale      [E, 2I, ceil(H/G)]      (G = -1: [E, 2I, 1])
    w13_weight_scale       fp32 [E, 2] per tensor, [E, 2I] per channel
    w13_input_scale        fp32 [E, 2]                  static activations only
    w2_*                   the same for down: [E, H, ceil(I/8)], ..., [E, 1] / [E, H]

The per-expert shapes and dtypes come from ``DPQScheme.layout`` and each expert's GEMM
weights from ``DPQScheme.w4a8``, the same code as a dense Linear's: per-tensor s_w of gate and
up become per channel, and gate and up share one static s_x (the largest if they differ,
warned once). Scales start NaN and every parameter records which (expert, shard) its loader
filled, so a tensor the checkpoint lacks is an error naming it.

Routing is vLLM's own: the runner selects experts (``router.select_experts``) and calls
``apply`` with the top-k ids and weights, as for the unquantized method. ``apply`` computes
``down(silu(gate(x)) * up(x))`` for each token's experts, weighted by the router weights and
summed in fp32, through the kernel backend chosen at load (``vllm_dpq.kernels``; INT4 stays
resident with the cpu backend): on the cpu backend's kernel one fused call per layer
(``kernels.cpu.CpuMoE``), else the tokens grouped by expert and two GEMMs per expert with tokens.

Tensor parallelism splits the intermediate size I (w13's rows, w2's K); each rank's slice of
w2's K must be a multiple of 8 and of the group size (``check_partition``). Expert
parallelism, biases, and activations other than SiLU-and-mul are refused.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, MoEActivation, UnquantizedFusedMoEMethod
from vllm.model_executor.utils import set_weight_attrs

from vllm_dpq.format import GROUP_SCALE, INPUT_SCALE, PACKED, WEIGHT_SCALE, CheckpointError
from vllm_dpq.kernels.cpu import CpuMoE, stack_experts
from vllm_dpq.plugin.linear_method import check_partition, free_weight_data, mismatch_warner, prepare_backend
from vllm_dpq.plugin.schemes import DPQScheme, nan_filled

# vLLM's shard ids of an expert: (parameter group, index of the shard in that group)
SHARDS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}


def moe_quant_method(quant_config, layer, prefix: str) -> FusedMoEMethodBase:
    """DPQMoEMethod if the checkpoint quantizes this MoE layer's experts, vLLM's unquantized
    method if it ignores all of them; an error if it quantizes only some."""
    stored = quant_config.stored
    if not isinstance(stored, DPQScheme):
        raise NotImplementedError(f"--quantization dpq: MoE layer {prefix}: only native DPQ checkpoints "
                                  f"serve MoE models (not {type(stored).__name__})")
    names = [f"{prefix}.{e}.{proj}" for e in range(layer.moe_config.num_logical_experts)
             for proj in expert_projections(layer).values()]
    if stored.quantizes_all(prefix, names, "MoE layer"):
        return DPQMoEMethod(quant_config, layer.moe_config, prefix)
    return UnquantizedFusedMoEMethod(layer.moe_config)


def expert_projections(layer) -> dict[str, str]:
    """vLLM shard id -> the checkpoint's name of that projection (gate_proj / w1, ...)."""
    return {"w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name, "w2": layer.ckpt_down_proj_name}


def _track_expert_loads(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Wrap param's MoE weight_loader to record the (expert, shard id) pairs it loaded."""
    inner = param.weight_loader
    param.dpq_loaded = set()

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):  # vLLM's names
        ok = inner(param, loaded_weight, weight_name, shard_id, expert_id, return_success=True)
        if ok:
            param.dpq_loaded.add((expert_id, shard_id))
        return ok if return_success else None

    load.supports_moe_loading = True
    param.weight_loader = load
    return param


def _input_scale_loader(layer):
    """vLLM's loader stores one input scale per expert (gate's and up's overwrite each other);
    keep one per projection, as weight scales are, so that differing ones are noticed."""
    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        expert = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if expert != -1:
            param.data[expert, SHARDS[shard_id][1]] = loaded_weight.reshape(())
        return expert != -1 if return_success else None
    return load


class DPQMoEMethod(FusedMoEMethodBase):
    def __init__(self, quant_config, moe, prefix: str):
        super().__init__(moe)
        self.stored: DPQScheme = quant_config.stored
        self.prefix = prefix

    def _refuse_unsupported(self, layer) -> None:
        moe, what = self.moe, None
        if moe.activation != MoEActivation.SILU:
            what = f"activation {moe.activation.value!r} (supported: silu, i.e. silu(gate) * up)"
        elif moe.has_bias:
            what = "expert biases"
        elif moe.use_ep:
            what = "expert parallelism"
        elif layer.apply_router_weight_on_input:
            what = "router weights applied on the input"
        elif any(v is not None for v in (layer.swiglu_limit, layer.swiglu_alpha, layer.swiglu_beta)):
            what = "a clamped / scaled SwiGLU"
        if what:
            raise NotImplementedError(f"DPQ MoE layer {self.prefix}: {what} is not supported")

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        self._refuse_unsupported(layer)
        h, i = hidden_size, intermediate_size_per_partition
        check_partition(f"{self.prefix} ({expert_projections(layer)['w2']} of every expert)",
                        self.moe.intermediate_size, i, self.stored.scheme.group_size)
        for group, n, k, shards in (("w13", 2 * i, h, 2), ("w2", h, i, 1)):
            for name, (kind, shape, dtype) in self.stored.layout(n, k, shards).items():
                init = torch.zeros if kind == "packed" else nan_filled
                param = torch.nn.Parameter(init(num_experts, *shape, dtype=dtype), requires_grad=False)
                set_weight_attrs(param, extra_weight_attrs)
                if kind != "packed":  # how RoutedExperts.weight_loader shards a scale
                    param.quant_method = kind
                if name == INPUT_SCALE:
                    param.weight_loader = _input_scale_loader(layer)
                layer.register_parameter(f"{group}_{name}", _track_expert_loads(param))

    def get_fused_moe_quant_config(self, layer):
        return None  # no vLLM MoE kernel runs these experts

    # ------------------------------------------------------------------ load end

    def _widths(self, layer) -> dict[str, list[int]]:
        i = layer.intermediate_size_per_partition
        return {"w13": [i, i], "w2": [layer.hidden_size]}

    def _validate(self, layer) -> None:
        names = expert_projections(layer)
        widths = self._widths(layer)
        shards_of = {g: [s for s, (grp, _) in SHARDS.items() if grp == g] for g in widths}

        def tensor(e, shard, name):
            return f"{self.prefix}.{e}.{names[shard]}.{name}"

        for name, p in layer.named_parameters(recurse=False):
            if not hasattr(p, "dpq_loaded"):
                continue
            group, _, tensor_name = name.partition("_")
            for e in range(layer.local_num_experts):
                for shard in shards_of[group]:
                    if (e, shard) not in p.dpq_loaded:
                        raise CheckpointError(f"tensor {tensor(e, shard, tensor_name)} missing from the checkpoint "
                                              f"(never loaded into vLLM layer {self.prefix})")
            if not p.data.is_floating_point():
                continue
            try:  # the whole parameter at once; if that fails, find the tensor to name
                self.stored.check_scale(f"{self.prefix}.{name}", p.data)
            except CheckpointError:
                for e in range(layer.local_num_experts):
                    pieces = p.data[e].split(1 if p.quant_method == "tensor" else widths[group])
                    for shard, piece in zip(shards_of[group], pieces):
                        try:
                            self.stored.check_scale(tensor(e, shard, tensor_name), piece)
                        except CheckpointError as err:
                            raise CheckpointError(f"{err} (missing from the checkpoint or invalid)") from None
                raise

    def process_weights_after_loading(self, layer) -> None:
        self._validate(layer)
        warn = mismatch_warner(self.prefix)
        static = self.stored.scheme.activation_scheme == "static"
        k = {"w13": layer.hidden_size, "w2": layer.intermediate_size_per_partition}
        widths = self._widths(layer)
        device = layer.w13_weight_packed.device
        experts = []
        for e in range(layer.local_num_experts):
            gemms = []
            for group in ("w13", "w2"):
                packed, group_scale, weight_scale, input_scale = (
                    getattr(layer, f"{group}_{name}").data[e] if static or name != INPUT_SCALE else None
                    for name in (PACKED, GROUP_SCALE, WEIGHT_SCALE, INPUT_SCALE))
                weights = self.stored.w4a8(packed, group_scale, weight_scale, input_scale, widths[group], k[group], warn)
                gemms.append(prepare_backend(weights, device))
            experts.append(tuple(gemms))
        layer._dpq_experts = experts  # [(w13 (backend, state), w2 (backend, state))] per local expert
        layer._dpq_grouped = _grouped(layer, experts)
        _LAYERS[self.prefix] = layer
        if not any(b.keeps_packed(s) for gemms in experts for b, s in gemms):  # the backend made its own copies
            free_weight_data(layer, [f"{g}_{n}" for g in ("w13", "w2") for n in (PACKED, GROUP_SCALE)])

    # ------------------------------------------------------------------ forward

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        """Routed experts only (the runner runs shared experts and the tensor-parallel all-reduce):
        one cpu kernel call (an opaque op the compiled graph calls directly), else the per-expert
        loop in an opaque custom op (vLLM's compiled mode cannot trace it: its trip counts depend
        on the routing)."""
        if layer._dpq_grouped is not None:
            return layer._dpq_grouped.apply(x, topk_weights, topk_ids)
        return torch.ops.vllm_dpq.moe_experts(x, topk_weights, topk_ids, self.prefix)


def _grouped(layer, experts) -> CpuMoE | None:
    """The layer's experts as one fused CPU kernel call where every expert runs on the cpu
    backend's kernel, else None (one backend call per expert and projection)."""
    if any(backend.name != "cpu" for gemms in experts for backend, _ in gemms):
        return None
    grouped = [stack_experts([gemms[j][1] for gemms in experts], getattr(layer, f"{group}_{PACKED}").data,
                             getattr(layer, f"{group}_{GROUP_SCALE}").data) for j, group in enumerate(("w13", "w2"))]
    return None if None in grouped else CpuMoE(*grouped)


# prefix -> loaded MoE layer, for the custom op (weak: a shut-down engine's layers are freed)
_LAYERS: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()


@torch.library.custom_op("vllm_dpq::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer: str) -> torch.Tensor:
    """sum over the top-k experts of weight * down(silu(gate(x)) * up(x)), grouped per expert:
    two backend calls per expert with tokens (the cpu kernel's fused op, CpuMoE, computes the
    same bits in one call)."""
    layer = _LAYERS[layer]
    top_k = topk_ids.shape[-1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(layer._dpq_experts))
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].float()
    i = layer.intermediate_size_per_partition
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for (w13, w2), count in zip(layer._dpq_experts, counts.tolist()):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        gate_up = w13[0].apply(w13[1], x[tokens[rows]])
        y = w2[0].apply(w2[1], F.silu(gate_up[:, :i]) * gate_up[:, i:])
        out.index_add_(0, tokens[rows], y.float() * weights[rows, None])
    return out.to(x.dtype)


@moe_experts.register_fake
def _(x, topk_weights, topk_ids, layer):
    return torch.empty_like(x)
