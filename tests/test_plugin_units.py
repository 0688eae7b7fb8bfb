"""vLLM plugin units (no engine): config parsing, sharded loading into vLLM's parallel linear
layers against the reference numerics, and clear errors for missing or bad tensors."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm")

from vllm_dpq.format import CheckpointError, DPQConfig, layer_tensors  # noqa: E402
from calibration.algorithms import quantize_rtn  # noqa: E402
from vllm_dpq.numerics import QuantizedWeight, Scheme, reference_linear  # noqa: E402

DPQ_DICT = {"quant_method": "dpq", "format_version": 1, "group_size": 32}
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def make_config(**scheme):
    from vllm_dpq.plugin.config import DPQQuantConfig

    cfg = DPQQuantConfig.from_config({**DPQ_DICT, **scheme})
    cfg.packed_modules_mapping = dict(PACKED)
    return cfg


# ----------------------------------------------------------------------------- config


def test_from_config_valid():
    cfg = make_config(group_size=64, weight_scale="channel", activation_scheme="static")
    assert cfg.get_name() == "dpq"
    assert cfg.scheme == Scheme(group_size=64, weight_scale="channel", activation_scheme="static")
    assert cfg.dpq.ignore == []
    assert torch.float32 in cfg.get_supported_act_dtypes()  # the fast dtype of CPUs without native bf16


@pytest.mark.parametrize("pattern", ["model.layers.1.mlp.down_proj", "down_proj", "*.1.mlp.*", "re:.*layers\\.1\\.mlp"])
def test_plugin_skips_what_calibration_skips(pattern):
    """One matcher (vllm_dpq.format.is_ignored) for calibration and serving: exact names, suffixes,
    globs and regexes skip the same layers; vLLM's fused layers follow their checkpoint shards."""
    from calibration.model import quantizable_linears
    from vllm_dpq.plugin.schemes import DPQScheme

    from conftest import tiny_model

    layer = tiny_model().model.layers[1]
    calibrated = set(quantizable_linears(layer, "model.layers.1", ["lm_head", pattern]))
    stored = make_config(ignore=["lm_head", pattern]).stored
    assert isinstance(stored, DPQScheme)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        prefix = f"model.layers.1.{name}"
        shards = [f"model.layers.1.{name.split('.')[0]}.{s}" for s in dict(PACKED).get(name.split(".")[1], [])]
        expected = all(s in calibrated for s in (shards or [prefix]))
        assert stored.quantizes(None, prefix, dict(PACKED)) == expected, (pattern, prefix)


def test_plugin_refuses_a_fused_layer_with_mixed_shards():
    stored = make_config(ignore=["model.layers.0.self_attn.k_proj"]).stored
    with pytest.raises(ValueError, match="fused layer model.layers.0.self_attn.qkv_proj"):
        stored.quantizes(None, "model.layers.0.self_attn.qkv_proj", dict(PACKED))


@pytest.mark.parametrize("bad, words", [
    ({"format_version": 99}, "format_version"),
    ({"group_size": 0}, "group_size"),
    ({"group_scale_dtype": "float16"}, "group_scale_dtype"),
])
def test_from_config_invalid(bad, words):
    from vllm_dpq.plugin.config import DPQQuantConfig

    with pytest.raises(CheckpointError, match=words):
        DPQQuantConfig.from_config({**DPQ_DICT, **bad})


def test_override_claims_only_dpq():
    from vllm_dpq.plugin.config import DPQQuantConfig

    over = DPQQuantConfig.override_quantization_method
    assert over(dict(DPQ_DICT), None) == "dpq"
    assert over(dict(DPQ_DICT), "dpq") == "dpq"
    assert over(dict(DPQ_DICT), "fp8") is None  # user asked for another method: vLLM reports it
    for other in (None, {}, {"quant_method": "gptq"}, {"quant_method": "compressed-tensors"}, "dpq"):
        assert over(other, None) is None


def test_registered_with_vllm():
    from vllm.model_executor.layers.quantization import get_quantization_config

    from vllm_dpq.plugin import register
    from vllm_dpq.plugin.config import DPQQuantConfig

    register()
    register()  # vLLM calls it in every process; must be idempotent
    assert get_quantization_config("dpq") is DPQQuantConfig


# ----------------------------------------------------------------------------- layers


def build(kind: str, cfg, k: int):
    """(layer, [(checkpoint prefix, shard id, rows)]) for one vLLM linear kind."""
    from vllm.model_executor.layers import linear as L

    d = dict(params_dtype=torch.bfloat16, quant_config=cfg)
    if kind == "qkv":  # 4 heads of 16, 2 kv heads: q 64, k 32, v 32 rows
        layer = L.QKVParallelLinear(k, 16, 4, 2, bias=False, prefix="model.layers.0.self_attn.qkv_proj", **d)
        return layer, [(f"model.layers.0.self_attn.{p}_proj", p, n) for p, n in (("q", 64), ("k", 32), ("v", 32))]
    if kind == "gate_up":
        layer = L.MergedColumnParallelLinear(k, [48, 40], bias=False, prefix="model.layers.0.mlp.gate_up_proj", **d)
        return layer, [("model.layers.0.mlp.gate_proj", 0, 48), ("model.layers.0.mlp.up_proj", 1, 40)]
    if kind == "row":
        layer = L.RowParallelLinear(k, 56, bias=True, prefix="model.layers.0.mlp.down_proj", **d)
        return layer, [("model.layers.0.mlp.down_proj", None, 56)]
    if kind == "column":
        layer = L.ColumnParallelLinear(k, 24, bias=True, prefix="model.layers.0.mlp.fc1", **d)
        return layer, [("model.layers.0.mlp.fc1", None, 24)]
    if kind == "replicated":
        layer = L.ReplicatedLinear(k, 24, bias=False, prefix="model.layers.0.mlp.router", **d)
        return layer, [("model.layers.0.mlp.router", None, 24)]
    raise ValueError(kind)


def load(layer, shards, scheme: Scheme, k: int, input_scales=None, skip=()):
    """Quantize a random weight per checkpoint projection (distinct magnitudes, hence distinct
    s_w), load it through the parameters' weight loaders as vLLM's model loader does, and
    return the full (concatenated) quantized weight."""
    g = torch.Generator().manual_seed(0)
    qws = []
    for i, (prefix, shard_id, n) in enumerate(shards):
        w = torch.randn(n, k, generator=g) * 0.02 * 4.0**i
        qw = quantize_rtn(w, scheme)
        qws.append(qw)
        s_x = None if input_scales is None else torch.tensor([input_scales[i]])
        for name, t in layer_tensors(prefix, qw, s_x).items():
            if name in skip:
                continue
            param = getattr(layer, name.rsplit(".", 1)[1])
            args = () if shard_id is None else (shard_id,)
            param.weight_loader(param, t, *args)
    return QuantizedWeight(
        q=torch.cat([qw.q for qw in qws]),
        group_scale=torch.cat([qw.group_scale for qw in qws]),
        weight_scale=torch.cat([qw.weight_scale.expand(qw.q.shape[0]) for qw in qws]),
        group_size=scheme.group(k),
    )


SCHEMES = {
    "g32-tensor-bf16-dynamic": (dict(group_size=32), 72),  # ragged last group (72 = 2*32 + 8)
    "g64-tensor-fp8-static": (dict(group_size=64, group_scale_dtype="float8_e4m3fn", activation_scheme="static"), 128),
    "channelgroup-channel-static": (dict(group_size=-1, weight_scale="channel", activation_scheme="static"), 100),
    "g16-channel-dynamic": (dict(group_size=16, weight_scale="channel"), 52),  # K % 8 != 0, ragged
}


@pytest.mark.parametrize("backend", ["cpu", "scaled_mm"])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row", "column", "replicated"])
def test_layer_matches_reference(tp1, monkeypatch, kind, scheme_name, backend):
    monkeypatch.setenv("DPQ_BACKEND", backend)
    scheme_kw, k = SCHEMES[scheme_name]
    cfg = make_config(**scheme_kw)
    layer, shards = build(kind, cfg, k)
    static = cfg.scheme.activation_scheme == "static"
    s_x = 0.011
    full = load(layer, shards, cfg.scheme, k, [s_x] * len(shards) if static else None)
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(layer.bias.shape))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer._dpq_backend.name == backend

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = layer.quant_method.apply(layer, x, layer.bias)
    ref = reference_linear(x, full, cfg.scheme.fp8_max, torch.tensor([s_x]) if static else None, layer.bias)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # one bf16 ulp of the output, plus half an ulp of the GEMM result (the CPU backend rounds
    # it to bf16 before the scales and bias; a bias can cancel most of it)
    gemm = reference_linear(x, full, cfg.scheme.fp8_max, torch.tensor([s_x]) if static else None).float()
    err = (y.float() - ref.float()).abs()
    assert (err <= 2**-7 * ref.float().abs() + 2**-8 * gemm.abs() + 1e-6).all(), err.max()
    # and through the layer's own forward
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, y)


def test_merged_per_tensor_weight_scale_expanded_per_channel(tp1):
    cfg = make_config(group_size=32)
    layer, shards = build("qkv", cfg, 64)
    full = load(layer, shards, cfg.scheme, 64)
    assert layer.weight_scale.shape == (3,)
    per_shard = layer.weight_scale.data.clone()
    assert len(set(per_shard.tolist())) == 3  # distinct s_w for q, k, v
    layer.quant_method.process_weights_after_loading(layer)
    s_w = layer._dpq_weights.weight_scale
    assert s_w.shape == (128,) and s_w.dtype == torch.float32
    expected = torch.cat([per_shard[0].expand(64), per_shard[1].expand(32), per_shard[2].expand(32)])
    assert torch.equal(s_w, expected)
    assert torch.equal(s_w, full.weight_scale)


def test_merged_static_input_scales_differ_uses_max(tp1, caplog):
    from vllm_dpq.plugin import linear_method

    linear_method._announced.clear()  # warned once per process
    cfg = make_config(group_size=32, activation_scheme="static")
    layer, shards = build("gate_up", cfg, 64)
    load(layer, shards, cfg.scheme, 64, [0.01, 0.03])
    with caplog.at_level(logging.WARNING, logger="vllm_dpq"):
        layer.quant_method.process_weights_after_loading(layer)
    assert layer._dpq_weights.input_scale.tolist() == [pytest.approx(0.03)]
    assert "different static input scales" in caplog.text


def test_log_lines_reach_vllms_handlers_set_up_after_registration():
    """vLLM 0.32 sets up its log handlers when it builds an engine, after loading the plugins
    in that process (an engine in the caller's process): the plugin's lines still reach them,
    at vLLM's level."""
    from vllm_dpq.plugin import linear_method, register

    ours, vllm = logging.getLogger("vllm_dpq"), logging.getLogger("vllm")
    saved = (ours.handlers, ours.level, ours.propagate, vllm.handlers, vllm.level)

    class Lines(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    try:
        ours.handlers, vllm.handlers = [], []
        register()  # no vLLM handler yet: nothing to share
        assert ours.handlers == []
        vllm.addHandler(Lines())
        vllm.setLevel(logging.WARNING)
        linear_method._announced.clear()
        linear_method.announce("test:info", logging.INFO, "DPQ: an info line")
        linear_method.announce("test:warning", logging.WARNING, "DPQ: a %s line", "warning")
        assert Lines.lines == ["DPQ: a warning line"]
    finally:
        ours.handlers, vllm.handlers = saved[0], saved[3]
        ours.setLevel(saved[1])
        vllm.setLevel(saved[4])
        ours.propagate = saved[2]
        linear_method._announced.clear()


@pytest.mark.parametrize("kind, missing", [
    ("qkv", "model.layers.0.self_attn.k_proj.weight_group_scale"),
    ("qkv", "model.layers.0.self_attn.v_proj.weight_packed"),
    ("gate_up", "model.layers.0.mlp.up_proj.weight_scale"),
    ("row", "model.layers.0.mlp.down_proj.weight_packed"),
    ("row", "model.layers.0.mlp.down_proj.input_scale"),
])
def test_missing_tensor_is_a_clear_error(tp1, kind, missing):
    cfg = make_config(group_size=32, activation_scheme="static")
    layer, shards = build(kind, cfg, 64)
    load(layer, shards, cfg.scheme, 64, [0.01] * len(shards), skip={missing})
    with pytest.raises(CheckpointError, match=f"tensor {missing} missing"):
        layer.quant_method.process_weights_after_loading(layer)


def test_non_finite_scale_is_a_clear_error(tp1):
    cfg = make_config(group_size=32)
    layer, shards = build("gate_up", cfg, 64)
    load(layer, shards, cfg.scheme, 64)
    layer.weight_group_scale.data[50, 1] = float("inf")  # row 50 belongs to up_proj (rows 48..87)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight_group_scale: scale is not finite"):
        layer.quant_method.process_weights_after_loading(layer)


def test_ignore_list_and_lm_head(tp1):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from vllm_dpq.plugin.linear_method import DPQLinearMethod

    cfg = make_config(ignore=[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"] + ["model.layers.0.mlp.down_proj"])
    layer, _ = build("qkv", cfg, 64)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    assert isinstance(build("row", cfg, 64)[0].quant_method, UnquantizedLinearMethod)
    assert isinstance(build("gate_up", cfg, 64)[0].quant_method, DPQLinearMethod)
    assert isinstance(cfg.get_quant_method(layer, "lm_head"), UnquantizedLinearMethod)
    emb = VocabParallelEmbedding(64, 32, params_dtype=torch.bfloat16)
    assert cfg.get_quant_method(emb, "model.embed_tokens") is None
    # a fused layer half in the ignore list is an error, not a silent choice
    half = make_config(ignore=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError):
        build("qkv", half, 64)


def test_row_parallel_split_check():
    from vllm_dpq.plugin.linear_method import check_partition

    check_partition("l", 576, 576, 128)  # TP 1: K is not split, ragged groups are fine
    check_partition("l", 100, 100, 32)
    check_partition("l", 576, 288, 32)  # TP 2, group 32 divides 288
    check_partition("l", 576, 288, -1)  # per-channel group: one scale per row, replicated
    msg = r"model.layers.3.mlp.down_proj: K=576 .*tensor-parallel size 2.* 288 .*group size 128"
    with pytest.raises(ValueError, match=msg):
        check_partition("model.layers.3.mlp.down_proj", 576, 288, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        check_partition("l", 200, 100, -1)
