"""Mixture-of-experts calibration, end to end on tiny random MoE models (hidden 128, 8 experts,
top-2, vocab 512, bf16): ``vllm-dpq quantize`` (in process) -> ``read_checkpoint`` -> the
reference forward against the fake-quantized Hugging Face model; routers stored untouched;
the tokens each expert saw; the rule for experts that saw too few (docs/ALGORITHMS.md).

One model per family of ``vllm_dpq.moe.MOE_FAMILIES``, each with what makes it different:
Qwen3-MoE (q/k norms), Mixtral (experts stored as block_sparse_moe.experts.<e>.w1/w3/w2),
Qwen2-MoE (a shared expert and its sigmoid gate), OLMoE, DeepSeek-V3 (a dense first layer,
shared experts, MLA attention, a router with a stored score bias; kv_lora_rank 512 and rope
dim 64 because vLLM-CPU's MLA takes only DeepSeek's own head dim, 576).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import corpus, save_tokenizer
from test_model_types import COMMON, VOCAB, fake_quantized

SEQ = 64
DEAD = 7  # DeepSeek-V3's router never picks this expert of layer 1 (score bias -1e4)
MOE = dict(num_experts_per_tok=2, tie_word_embeddings=False)
# model_type -> (config overrides, activations); every family of MOE_FAMILIES has an entry
ARCHS = {
    "qwen3_moe": (dict(moe_intermediate_size=64, num_experts=8), "dynamic"),
    "mixtral": (dict(intermediate_size=64, num_local_experts=8), "static"),
    "qwen2_moe": (dict(moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=8), "static"),
    "olmoe": (dict(intermediate_size=64, num_experts=8), "dynamic"),
    "deepseek_v3": (dict(moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                         n_shared_experts=1, n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=512,
                         qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, head_dim=64,
                         num_key_value_heads=4, topk_method="noaux_tc", scoring_func="sigmoid"), "static"),
}


def tiny_moe(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **MOE, **ARCHS[model_type][0]})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if model_type == "deepseek_v3":
        model.model.layers[1].mlp.gate.e_score_correction_bias[DEAD] = -1e4
    return model


def quantize(src: Path, out: Path, *args: str) -> dict:
    """Run `vllm-dpq quantize` in process; its --stats-json."""
    from calibration.cli import quantize_main

    data = corpus("austen_sensesensibility.txt")
    stats = out.with_name(out.name + ".json")
    rc = quantize_main([str(src), str(out), "--data", str(data), "--num-samples", "8", "--seq-len", str(SEQ),
                        "--calib-dtype", "float32", "--stats-json", str(stats), *args])
    assert rc == 0
    return json.loads(stats.read_text())


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """model_type -> (bf16 source folder, DPQ checkpoint, its calibration stats)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for model_type, (_, activations) in ARCHS.items():
        src, ckpt = root / model_type, root / f"{model_type}-dpq"
        tiny_moe(model_type).save_pretrained(src)
        save_tokenizer(src, corpus("austen_sensesensibility.txt").read_text()[:20000])
        out[model_type] = src, ckpt, quantize(src, ckpt, "--method", "dpq", "--activations", activations)
    return out


def test_every_moe_family_is_covered():
    from calibration.model import SUPPORTED_TYPES
    from vllm_dpq.moe import MOE_FAMILIES

    assert sorted(ARCHS) == sorted(MOE_FAMILIES) and set(MOE_FAMILIES) <= set(SUPPORTED_TYPES)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_experts_quantized_under_checkpoint_names(moe_family, model_type):
    """Every expert projection (and shared expert) is a quantized layer under its stored name;
    routers and shared-expert gates are not quantized, are listed in ignore, and are stored
    byte-identical to the source model."""
    from vllm_dpq.format import read_checkpoint
    from vllm_dpq.moe import MOE_FAMILIES
    from vllm_dpq.shards import TensorFiles

    src, path, _ = moe_family[model_type]
    ckpt, source, stored = read_checkpoint(path), TensorFiles(src), TensorFiles(path)
    fam = MOE_FAMILIES[model_type]
    block = fam.block or "mlp"
    moe_layers = [1, 2] if model_type == "deepseek_v3" else [0, 1]
    for i in moe_layers:
        for e in range(8):
            for proj in (fam.gate, fam.up, fam.down):
                assert f"model.layers.{i}.{block}.experts.{e}.{proj}" in ckpt.layers
        routers = [f"model.layers.{i}.{block}.gate"] + (
            [f"model.layers.{i}.mlp.shared_expert_gate"] if model_type == "qwen2_moe" else [])
        for r in routers:
            assert r in ckpt.config.ignore and r not in ckpt.layers
            for name in source:
                if name.startswith(r + "."):
                    assert torch.equal(stored[name].view(torch.uint8), source[name].view(torch.uint8)), name
    shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(model_type)
    if shared:
        assert f"model.layers.{moe_layers[0]}.mlp.{shared}.down_proj" in ckpt.layers
    if model_type == "deepseek_v3":  # MLA's kv_b_proj is folded into vLLM's attention: kept
        assert all(f"model.layers.{i}.self_attn.kv_b_proj" in ckpt.config.ignore for i in range(3))
    n_expert = sum(".experts." in n for n in ckpt.layers)
    assert n_expert == 3 * 8 * len(moe_layers)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_reference_is_the_fake_quantized_model(moe_family, model_type):
    """The reference forward of the checkpoint computes the source model with W_eff weights and
    FP8 inputs. Near ties of the router flip an expert choice at a few positions (the two
    sides round in another order), so the bound is on the median and on the argmax."""
    from vllm_dpq.format import read_checkpoint
    from vllm_dpq.reference import ReferenceW4A8Linear, load_reference_model

    src, path, _ = moe_family[model_type]
    ckpt = read_checkpoint(path)
    reference, _ = load_reference_model(path)
    assert sum(isinstance(m, ReferenceW4A8Linear) for m in reference.modules()) == len(ckpt.layers)
    fake = fake_quantized(src, ckpt)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = reference(ids).logits, fake(ids).logits
    # [measured: median 3e-7 to 6e-7 for every family; max 1e-5 to 0.5 where a routing flipped]
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()
    assert rel.median() < 1e-5, rel.median().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_expert_tokens_are_reported(moe_family, model_type):
    """Each MoE block's experts saw top_k tokens per calibration token in all."""
    _, _, stats = moe_family[model_type]
    blocks = stats["expert_tokens"]
    assert len(blocks) == 2  # DeepSeek-V3: its first layer is dense
    for counts in blocks.values():
        assert len(counts) == 8 and sum(counts) == 8 * SEQ * MOE["num_experts_per_tok"]


def test_expert_without_tokens_falls_back(moe_family, tmp_path):
    """DeepSeek-V3's layer 1 never routes to expert DEAD: calibration does not fail; the expert
    is reported with 0 tokens, quantized by rtn (its codes are rtn's), and takes the largest
    static input scale of its siblings. With --moe-experts all it gets a Hessian (no rtn)."""
    from calibration.algorithms import Recipe, quantize_layer
    from vllm_dpq.format import read_checkpoint
    from vllm_dpq.shards import TensorFiles

    src, path, stats = moe_family["deepseek_v3"]
    block = "model.layers.1.mlp.experts"
    assert stats["expert_tokens"][block][DEAD] == 0
    ckpt = read_checkpoint(path)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"{block}.{DEAD}.{proj}"
        assert stats["expert_fallbacks"][name] == ["rtn", "scale"]
        w = TensorFiles(src)[f"{name}.weight"].float()
        rtn = quantize_layer(w, None, Recipe(method="rtn", scheme=ckpt.config.scheme)).qw
        assert torch.equal(ckpt.quantized(name).q, rtn.q)
        siblings = [ckpt.input_scale(f"{block}.{e}.{proj}").item() for e in range(8)]
        assert ckpt.input_scale(name).item() == max(siblings)
    everyone = quantize(src, tmp_path / "all", "--method", "dpq", "--activations", "static", "--moe-experts", "all")
    assert all(kinds == ["scale"] for n, kinds in everyone["expert_fallbacks"].items() if n.startswith(block + "."))
    assert set(everyone["expert_fallbacks"]) >= {f"{block}.{DEAD}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_resume_keeps_expert_stats(tmp_path):
    """The work folder of --resume carries the expert tokens and fallbacks of committed layers."""
    from calibration.pipeline import CalibrationResult
    from calibration.resume import CalibrationState

    result = CalibrationResult(layer_errors=[0.1], expert_tokens={"b": [1, 2]}, expert_fallbacks={"b.0.w1": ["rtn"]})
    state = CalibrationState(tmp_path / "work", {"x": 1})
    state.start()
    state.commit(0, {}, result.stats(), [torch.zeros(1, 2, 4)])
    done, stats, hidden = state.load()
    restored = CalibrationResult()
    restored.restore(stats)
    assert done == 0 and restored.stats() == result.stats() and torch.equal(hidden[0], torch.zeros(1, 2, 4))


def test_export_to_stock_vllm_moe(moe_family, tmp_path):
    """`--target compressed-tensors` + export: every expert projection under its per-expert name
    in stock vLLM's W4A8-FP8 layout, bit-exact to our W_eff, routers in the ignore list. Experts
    with sizes stock vLLM's W4A8 MoE cannot take (not multiples of 256) are refused, named once
    per projection."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_dpq.format import read_checkpoint
    import vllm_dpq.interop as ct

    with pytest.raises(ct.InteropError, match=r"experts\.\*\.w1: \[N, K\] = \[64, 128\].*multiples of 256"):
        ct.export_compressed_tensors(moe_family["mixtral"][1], tmp_path / "refused")
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **{**COMMON, **MOE, "hidden_size": 256, "head_dim": 64,
                                                  "moe_intermediate_size": 256, "num_experts": 4})
    src, dpq, out = tmp_path / "src", tmp_path / "dpq", tmp_path / "ct"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(src)
    save_tokenizer(src, corpus("austen_sensesensibility.txt").read_text()[:20000])
    quantize(src, dpq, "--method", "dpq", "--target", "compressed-tensors", "--group-size", "128")
    report = ct.export_compressed_tensors(dpq, out, exact=True)
    ckpt = read_checkpoint(dpq)
    experts = [p for p in ckpt.layers if ".experts." in p]
    assert len(experts) == 2 * 4 * 3 and report.exact
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"} <= set(ignore)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for p in experts:
            qw = ckpt.quantized(p)
            assert torch.equal(f.get_tensor(f"{p}.weight_packed"), ckpt.tensors[f"{p}.weight_packed"]), p
            assert torch.equal(ct.folded_effective_weight(qw.q, f.get_tensor(f"{p}.weight_scale"), 128),
                               qw.dequantize(448.0)), p


@pytest.mark.parametrize("case", ["missing expert tensor", "fewer experts in config"])
def test_incomplete_moe_checkpoint_is_refused(moe_family, tmp_path, case):
    """read_checkpoint (and so the reference forward, inspect, export) names what is wrong."""
    from test_format import corrupt

    from vllm_dpq.format import CheckpointError, read_checkpoint

    p = "model.layers.0.mlp.experts.3.up_proj"
    fn, message = {
        "missing expert tensor": (lambda t, c, m: t.pop(f"{p}.weight_group_scale"), f"missing tensor {p}.weight_group_scale"),
        "fewer experts in config": (lambda t, c, m: c.update(num_local_experts=2),
                                    "layer model.layers.0.mlp.experts.2.down_proj: in dpq_manifest.json, not in config"),
    }[case]
    bad = corrupt(moe_family["qwen3_moe"][1], tmp_path / "bad", fn)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        read_checkpoint(bad)


def test_synthetic_moe_model_is_a_qwen3_moe(tmp_path):
    """benchmarks/synthetic_model.py with experts: a folder transformers loads with every weight."""
    from transformers import AutoModelForCausalLM

    from benchmarks.synthetic_model import Shape, build_model

    shape = Shape(hidden=128, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=512, experts=4)
    folder = build_model(tmp_path / "moe", shape, corpus("austen_sensesensibility.txt"))
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) == shape.params()


def test_true_sequential_keeps_moe_layers_in_one_pass():
    """--true-sequential covers dense layers; a layer with an MoE block (every layer of Mixtral)
    is quantized from one pass, so the codes are those of the default order."""
    from calibration.algorithms import Recipe
    from calibration.pipeline import calibrate
    from vllm_dpq.numerics import Scheme

    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    one, seq = (calibrate(tiny_moe("mixtral").float(), ids, Recipe(scheme=Scheme(32), true_sequential=s), ["lm_head"],
                          progress=False).layers for s in (False, True))
    assert one.keys() == seq.keys() and len(one) > 0
    for name in one:
        assert torch.equal(one[name].qw.q, seq[name].qw.q), name
