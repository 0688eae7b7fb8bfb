"""DPQ MoE method units (no engine): vLLM's fused-MoE layer with DPQ experts, filled by vLLM's
own expert weight loader from per-expert checkpoint tensors, routed by vLLM's router, against
a plain per-expert computation with the reference numerics; tensor parallel 2 (two gloo
ranks); clear errors for missing tensors, partial ignore lists and unsupported layers.

Not covered here: the Triton backend. It runs on CUDA only (select_backend never picks it on
CPU) and the MoE method calls a backend exactly as a Linear does, one GEMM per expert and
projection, so tests/test_triton_kernel.py's interpreter checks of that GEMM cover it."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")

from calibration.algorithms import quantize_rtn  # noqa: E402
from conftest import free_port, vllm_distributed  # noqa: E402
from vllm_dpq.format import CheckpointError, layer_tensors  # noqa: E402
from vllm_dpq.kernels import cpu  # noqa: E402
from vllm_dpq.numerics import Scheme, reference_linear  # noqa: E402

E, TOP_K, H, I = 8, 2, 72, 64  # H = 72: a ragged last group at G = 32 / 64 (K = H is never split)
T = 12  # tokens
DPQ_DICT = {"quant_method": "dpq", "format_version": 1}
QWEN = ("gate_proj", "up_proj", "down_proj")  # gate, up, down as the checkpoint names them
MIXTRAL = ("w1", "w3", "w2")
_layer_index = itertools.count()


def make_config(**kw):
    from vllm_dpq.plugin.config import DPQQuantConfig

    cfg = DPQQuantConfig.from_config({**DPQ_DICT, **kw})
    cfg.packed_modules_mapping = {}
    return cfg


def build(cfg, names=QWEN, layer: int | None = None, hidden: int = H, **kw):
    """vLLM's MoE runner (router + routed experts) for one layer, and its checkpoint prefix."""
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    layer = next(_layer_index) if layer is None else layer  # each layer registers its name once
    block = "block_sparse_moe" if names == MIXTRAL else "mlp"
    prefix = f"model.layers.{layer}.{block}.experts"
    runner = FusedMoEFactory(num_experts=E, top_k=TOP_K, hidden_size=hidden, intermediate_size=I,
                             params_dtype=torch.bfloat16, quant_config=cfg, prefix=prefix,
                             ckpt_names=(names[0], names[2], names[1]), **kw)
    return runner, prefix


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, H, generator=g).to(torch.bfloat16), torch.randn(T, E, generator=g)


def checkpoint(prefix: str, scheme: Scheme, x: torch.Tensor, names=QWEN, up_scale_factor: float = 1.0):
    """Per-expert checkpoint tensors {name: tensor} (gate and up of an expert with distinct s_w),
    and each expert's (QuantizedWeight, s_x) per projection. Static s_x: gate and up share the
    expert's input scale (experts differ); down's is measured on x's activations, so that the
    FP8 grid fits them."""
    g = torch.Generator().manual_seed(0)
    static = scheme.activation_scheme == "static"
    tensors, experts = {}, []
    for e in range(E):
        s_in = torch.tensor([x.float().abs().max().item() / 448 * (1 + e / 4)]) if static else None
        gate, up = (quantize_rtn(torch.randn(I, H, generator=g) * 0.05 * 2.0 ** (j + e % 3), scheme) for j in (0, 1))
        down = quantize_rtn(torch.randn(H, I, generator=g) * 0.05, scheme)
        s_down = None
        if static:
            a = F.silu(reference_linear(x, gate, scheme.fp8_max, s_in)) * reference_linear(x, up, scheme.fp8_max, s_in)
            s_down = torch.tensor([a.float().abs().max().item() / 448])
        s_up = None if s_in is None else s_in * up_scale_factor
        expert = {names[0]: (gate, s_in), names[1]: (up, s_up), names[2]: (down, s_down)}
        for proj, (qw, s_x) in expert.items():
            tensors.update(layer_tensors(f"{prefix}.{e}.{proj}", qw, s_x))
        experts.append(expert)
    return tensors, experts


def load(runner, prefix: str, tensors: dict, skip=()) -> None:
    """Through vLLM's loader: RoutedExperts.load_weights maps each per-expert checkpoint name to
    its w13_/w2_ parameter, shard and expert, as the model's AutoWeightsLoader calls it."""
    weights = [(name.removeprefix(prefix + "."), t) for name, t in tensors.items() if name not in skip]
    list(runner.routed_experts.load_weights(weights))


def reference(x, topk_weights, topk_ids, experts, scheme: Scheme, names=QWEN) -> torch.Tensor:
    """Each routed expert on its tokens with reference_linear, weighted and summed in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e, expert in enumerate(experts):
        token, slot = torch.where(topk_ids == e)
        if not token.numel():
            continue
        gate, up, down = (expert[n] for n in names)
        xs = x[token]
        a = F.silu(reference_linear(xs, gate[0], scheme.fp8_max, gate[1])) * \
            reference_linear(xs, up[0], scheme.fp8_max, up[1])
        y = reference_linear(a, down[0], scheme.fp8_max, down[1])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def route(runner, x, logits):
    return runner.router.select_experts(hidden_states=x, router_logits=logits, topk_indices_dtype=None,
                                        input_ids=None)


def assert_close_to(y, ref):
    """One bf16 ulp of the output (fp32 summation order), plus a little absolute slack."""
    err = (y.float() - ref.float()).abs()
    assert (err <= 2**-7 * ref.float().abs() + 1e-3 * ref.float().abs().max()).all(), err.max()


SCHEMES = {
    "g32-tensor-bf16-static": dict(group_size=32, activation_scheme="static"),
    "g32-tensor-bf16-dynamic": dict(group_size=32),
    "g16-channel-fp8-static": dict(group_size=16, weight_scale="channel", group_scale_dtype="float8_e4m3fn",
                                   activation_scheme="static"),
    "channelgroup-channel-dynamic": dict(group_size=-1, weight_scale="channel"),
}


@pytest.mark.parametrize("backend", ["cpu", "scaled_mm"])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_moe_matches_reference(tp1, monkeypatch, scheme_name, backend):
    from vllm_dpq.plugin.moe_method import DPQMoEMethod

    monkeypatch.setenv("DPQ_BACKEND", backend)
    monkeypatch.setenv("DPQ_CPU_GEMM", "float32")  # bit-exact FP8 products and fp32 sums on any CPU
    names = MIXTRAL if scheme_name.startswith("g16") else QWEN
    cfg = make_config(**SCHEMES[scheme_name])
    runner, prefix = build(cfg, names)
    experts_layer = runner.routed_experts
    assert isinstance(experts_layer.quant_method, DPQMoEMethod)
    x, logits = inputs()
    tensors, experts = checkpoint(prefix, cfg.scheme, x, names)
    load(runner, prefix, tensors)
    experts_layer.quant_method.process_weights_after_loading(experts_layer)
    assert {b.name for gemms in experts_layer._dpq_experts for b, _ in gemms} == {backend}
    if backend == "cpu":  # INT4 stays resident: the backend computes from the loaded codes
        state = experts_layer._dpq_experts[3][1][1]
        assert state.weights.packed.data_ptr() == experts_layer.w2_weight_packed[3].data_ptr()

    topk_weights, topk_ids = route(runner, x, logits)
    assert len(set(topk_ids.flatten().tolist())) > E // 2  # most experts have tokens
    y = experts_layer.quant_method.apply(experts_layer, x, topk_weights, topk_ids, None, None)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert_close_to(y, reference(x, topk_weights, topk_ids, experts, cfg.scheme, names))
    if backend == "cpu" and cpu.kernels() is not None:  # the fused path: two grouped kernel calls,
        assert experts_layer._dpq_grouped is not None  # each row computed as by its expert's own call
        grouped, experts_layer._dpq_grouped = experts_layer._dpq_grouped, None
        try:
            per_expert = experts_layer.quant_method.apply(experts_layer, x, topk_weights, topk_ids, None, None)
        finally:
            experts_layer._dpq_grouped = grouped
        assert torch.equal(y, per_expert)


def test_per_tensor_weight_scales_expanded_per_channel(tp1):
    cfg = make_config(group_size=32)
    runner, prefix = build(cfg)
    layer = runner.routed_experts
    x, _ = inputs()
    tensors, experts = checkpoint(prefix, cfg.scheme, x)
    load(runner, prefix, tensors)
    assert layer.w13_weight_scale.shape == (E, 2) and layer.w2_weight_scale.shape == (E, 1)
    layer.quant_method.process_weights_after_loading(layer)
    for e in (0, 5):
        gate, up = experts[e]["gate_proj"][0], experts[e]["up_proj"][0]
        assert gate.weight_scale.item() != up.weight_scale.item()
        s_w = layer._dpq_experts[e][0][1].weights.weight_scale
        assert torch.equal(s_w, torch.cat([gate.weight_scale.expand(I), up.weight_scale.expand(I)]))


def test_gate_and_up_static_input_scales_differ_uses_max(tp1, caplog):
    from vllm_dpq.plugin import linear_method

    linear_method._announced.clear()  # warned once per process
    cfg = make_config(group_size=32, activation_scheme="static")
    runner, prefix = build(cfg)
    layer = runner.routed_experts
    x, _ = inputs()
    tensors, experts = checkpoint(prefix, cfg.scheme, x, up_scale_factor=1.5)
    load(runner, prefix, tensors)
    with caplog.at_level(logging.WARNING, logger="vllm_dpq"):
        layer.quant_method.process_weights_after_loading(layer)
    for e in range(E):
        s_x = layer._dpq_experts[e][0][1].weights.input_scale
        assert s_x.tolist() == [pytest.approx(experts[e]["up_proj"][1].item())]
        assert layer._dpq_experts[e][1][1].weights.input_scale.item() == experts[e]["down_proj"][1].item()
    assert caplog.text.count("different static input scales") == 1


@pytest.mark.parametrize("missing", [
    "model.layers.{L}.mlp.experts.3.up_proj.weight_group_scale",
    "model.layers.{L}.mlp.experts.0.gate_proj.weight_packed",
    "model.layers.{L}.mlp.experts.7.down_proj.weight_packed",
    "model.layers.{L}.mlp.experts.5.up_proj.weight_scale",
    "model.layers.{L}.mlp.experts.2.down_proj.input_scale",
    "model.layers.{L}.mlp.experts.6.gate_proj.input_scale",
])
def test_missing_expert_tensor_is_a_clear_error(tp1, missing):
    cfg = make_config(group_size=32, activation_scheme="static")
    layer_index = next(_layer_index)
    missing = missing.format(L=layer_index)
    runner, prefix = build(cfg, layer=layer_index)
    x, _ = inputs()
    tensors, _ = checkpoint(prefix, cfg.scheme, x)
    assert missing in tensors
    load(runner, prefix, tensors, skip={missing})
    with pytest.raises(CheckpointError, match=f"tensor {missing} missing from the checkpoint"):
        runner.routed_experts.quant_method.process_weights_after_loading(runner.routed_experts)


def test_bad_expert_scale_is_named(tp1):
    cfg = make_config(group_size=32, weight_scale="channel")
    runner, prefix = build(cfg)
    x, _ = inputs()
    tensors, _ = checkpoint(prefix, cfg.scheme, x)
    tensors[f"{prefix}.4.up_proj.weight_scale"][10] = -1.0
    load(runner, prefix, tensors)
    with pytest.raises(CheckpointError, match=f"tensor {prefix}.4.up_proj.weight_scale: scale is not positive"):
        runner.routed_experts.quant_method.process_weights_after_loading(runner.routed_experts)


def test_ignored_experts_and_routers(tp1):
    from vllm.model_executor.layers.fused_moe import GateLinear, UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_dpq.plugin.moe_method import DPQMoEMethod

    layer_index = next(_layer_index)
    ignore = [f"model.layers.{layer_index}.mlp.gate", "re:.*\\.experts\\."]
    # vLLM's unquantized CPU experts need H divisible by 64
    runner, _ = build(make_config(group_size=32, ignore=ignore), layer=layer_index, hidden=64)
    assert isinstance(runner.routed_experts.quant_method, UnquantizedFusedMoEMethod)
    router = GateLinear(H, E, quant_config=make_config(group_size=32, ignore=ignore),
                        prefix=f"model.layers.{layer_index}.mlp.gate")
    assert isinstance(router.quant_method, UnquantizedLinearMethod)
    assert isinstance(build(make_config(group_size=32, ignore=ignore[:1]))[0].routed_experts.quant_method,
                      DPQMoEMethod)
    # experts half in the ignore list are refused, naming the layer
    with pytest.raises(ValueError, match=r"ignores .*experts\.0\.down_proj.* MoE layer model\.layers\.\d+\.mlp\.experts"):
        build(make_config(group_size=32, ignore=["down_proj"]))


def test_unsupported_activation_is_refused(tp1):
    with pytest.raises(NotImplementedError, match="activation 'gelu'"):
        build(make_config(group_size=32), activation="gelu")


# ----------------------------------------------------------------------------- tensor parallel 2


def _tp2_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: the layer sharded over both (vLLM splits I: w13's rows, w2's K),
    the same checkpoint and routing as TP 1, the partial outputs all-reduced as the runner does."""
    import os

    torch.set_num_threads(1)
    os.environ["DPQ_CPU_GEMM"] = "float32"
    from vllm.distributed import tensor_model_parallel_all_reduce

    result = {}
    with vllm_distributed(world_size=2, rank=rank, port=port):
        cfg = make_config(group_size=32, activation_scheme="static")
        runner, prefix = build(cfg, layer=0)
        layer = runner.routed_experts
        assert layer.w2_weight_packed.shape == (E, H, I // 2 // 8)
        x, logits = inputs()
        tensors, experts = checkpoint(prefix, cfg.scheme, x)
        load(runner, prefix, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        topk_weights, topk_ids = route(runner, x, logits)
        y = layer.quant_method.apply(layer, x, topk_weights, topk_ids, None, None)
        result["y"] = tensor_model_parallel_all_reduce(y)
        result["ref"] = reference(x, topk_weights, topk_ids, experts, cfg.scheme)
        try:  # I / 2 = 32 columns of w2 per rank: not whole groups of 64
            build(make_config(group_size=64), layer=1)
        except ValueError as e:
            result["g64"] = str(e)
    torch.save(result, f"{out}/rank{rank}.pt")


def test_tensor_parallel_2_matches_reference(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_tp2_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        # each rank's partial sum is rounded to bf16 before the all-reduce: two roundings
        err = (r["y"].float() - r["ref"].float()).abs()
        assert (err <= 2**-6 * r["ref"].float().abs() + 2e-3 * r["ref"].float().abs().max()).all(), err.max()
        assert "K=64 split over tensor-parallel size 2" in r["g64"] and "group size 64" in r["g64"]
