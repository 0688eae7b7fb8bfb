"""DPQModifier inside llm-compressor's oneshot (run with the llm-compressor venv's python:
scripts/llmcompressor_env.sh; skipped where llmcompressor is not installed).

Each layer of the saved compressed-tensors checkpoint is checked against the project's own
``quantize_layer`` on the Hessian llm-compressor accumulated for it, and stock vLLM's fold of
its scales against the FP8 values DPQ optimised. Run as a script, this file writes the
checkpoints that the main venv's serving test (tests/test_llmcompressor_serving.py) serves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor.modifiers")  # (a bare "llmcompressor" could be a folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models

from conftest import save_tiny_model_dir  # noqa: E402

import calibration.llmcompressor as llmc  # noqa: E402
from calibration.algorithms import quantize_layer  # noqa: E402
from vllm_dpq.interop.ct_format import read_compressed_tensors, w4a8_fp8_args  # noqa: E402
from vllm_dpq.interop.fold import export_group_scales, fold_group_scales, folded_effective_weight  # noqa: E402
from vllm_dpq.packing import unpack_int4  # noqa: E402

SAMPLES, SEQ = 8, 64
# K and N multiples of 128 (stock vLLM's CUTLASS W4A8 shapes); k_proj / v_proj N = 128
# (initializer_range: peaky logits, few near-ties for the serving test's greedy comparison)
MODEL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.15 * (128 / 256) ** 0.5)
YAML = """\
dpq_stage:
  dpq_modifiers:
    DPQModifier:
      group_size: {group}
      gar: true
      scale_search: max
      ignore: ["lm_head"]
"""


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 512, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


def run_oneshot(src: Path, out: Path, recipe, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """oneshot + llm-compressor's save_pretrained; returns {layer: (weight, Hessian)} as the
    modifier handed them to the quantizer."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    seen, original = {}, llmc.dpq_layer

    def recording(weight, h, recipe_, name="layer"):
        seen[name] = (weight.detach().clone(), h.detach().clone())
        return original(weight, h, recipe_, name)

    ids = calibration_ids()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    llmc.dpq_layer = recording
    try:
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=SAMPLES, max_seq_length=SEQ)
    finally:
        llmc.dpq_layer = original
    model.save_pretrained(out, save_compressed=True)
    return seen


def make_checkpoints(root: Path, moe: bool = False) -> dict[str, tuple[Path, Path, dict]]:
    """{name: (source model, checkpoint, recorded layers)}: a bf16 Llama through a Python
    recipe at group 128 (the stock-vLLM case), a fp32 one through a YAML recipe at group 64;
    with ``moe``, a bf16 Qwen3-MoE at group 32 (llm-compressor linearizes its experts)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    if moe:
        from conftest import save_tokenizer
        from test_moe import tiny_moe

        src = root / "src-moe"
        tiny_moe("qwen3_moe").save_pretrained(src)
        save_tokenizer(src)
        recipe = [llmc.DPQModifier(group_size=32, ignore=["lm_head", "re:.*mlp.gate$"])]
        out["moe"] = (src, root / "moe", run_oneshot(src, root / "moe", recipe, torch.bfloat16))
        return out
    src = save_tiny_model_dir(root / "src-bf16", dtype=torch.bfloat16, **MODEL)
    recipe = [llmc.DPQModifier(group_size=128, ignore=["lm_head"])]
    out["g128"] = (src, root / "g128", run_oneshot(src, root / "g128", recipe, torch.bfloat16))
    src = save_tiny_model_dir(root / "src-fp32", layers=1, **MODEL)
    (root / "recipe.yaml").write_text(YAML.format(group=64))
    out["g64"] = (src, root / "g64", run_oneshot(src, root / "g64", str(root / "recipe.yaml"), torch.float32))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("llmc"))


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("llmc-moe"), moe=True)


def test_modifier_settings_and_refusals():
    assert "vllm" not in sys.modules  # the modifier (and what it imports of vllm_dpq) needs no vLLM
    m = llmc.DPQModifier(group_size=64, gar=True, codes="round", dampening_frac=0.05, block_size=64)
    r = m.dpq_recipe()
    assert (r.method, r.fold, r.order, r.codes, r.scale_search, r.damp, r.block_size) == \
        ("dpq", "vllm", "gar", "round", "mse", 0.05, 64)
    assert (r.scheme.group_size, r.scheme.weight_scale, r.scheme.group_scale_dtype) == (64, "channel", "float8_e4m3fn")
    d = llmc.DPQModifier().dpq_recipe()  # the CLI's default GAR; no GPTAQ (one activation stream)
    assert (d.order, d.asym, d.scheme.group_size) == ("gar", False, 128)
    assert llmc.DPQModifier(actorder="static").dpq_recipe().order == "act"
    assert llmc.DPQModifier(gar=False).dpq_recipe().order == "none"
    p = llmc.DPQModifier(paper_recipe=True).dpq_recipe()
    assert (p.scale_search, p.codes, p.refit_scales, p.order, p.asym) == ("max", "round", False, "none", False)
    for bad, msg in ((dict(gar=True, actorder="static"), "exclusive"), (dict(group_size=-1), "positive"),
                     (dict(scheme="W4A16"), "drop scheme"), (dict(scale_search="min"), "scale_search"),
                     (dict(dampening_frac=1.5), "damp")):
        with pytest.raises(ValueError, match=msg):
            llmc.DPQModifier(**bad)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        llmc.dpq_layer(torch.ones(8, 128, dtype=torch.float16), torch.eye(128), m.dpq_recipe())


def test_yaml_recipe_finds_the_registered_modifier():
    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.recipe import Recipe

    assert ModifierFactory._registered_registry["DPQModifier"] is llmc.DPQModifier
    example = Path(__file__).resolve().parents[2] / "examples" / "llmcompressor_dpq_recipe.yaml"
    mods = Recipe.create_instance(str(example)).modifiers
    assert [type(m) for m in mods] == [llmc.DPQModifier]
    assert mods[0].group_size == 128 and mods[0].ignore == ["lm_head"]


@pytest.mark.parametrize("name", ["g128", "g64", "moe"])
def test_each_layer_is_quantize_layer_on_the_same_hessian(request, name):
    from transformers import AutoModelForCausalLM

    src, out, seen = request.getfixturevalue("moe_ckpts" if name == "moe" else "ckpts")[name]
    group = {"g128": 128, "g64": 64, "moe": 32}[name]
    dtype = torch.float32 if name == "g64" else torch.bfloat16
    source = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).state_dict()
    hf, scheme, layers, rest = read_compressed_tensors(out)
    cfg = hf["quantization_config"]
    w_args, a_args = w4a8_fp8_args(cfg)  # what the DPQ plugin (and stock vLLM) accept
    assert (w_args.group_size, cfg["format"]) == (group, "pack-quantized")
    routers = [f"model.layers.{i}.mlp.gate" for i in range(hf["num_hidden_layers"])] if name == "moe" else []
    assert sorted(cfg["ignore"]) == sorted(["lm_head", *routers])
    assert scheme.group_size == group
    mlp = (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if name != "moe" else  # every expert; no router
           tuple(f"mlp.experts.{e}.{x}_proj" for e in range(hf.get("num_experts") or hf["num_local_experts"]) for x in ("gate", "up", "down")))
    want = {f"model.layers.{i}.{p}" for i in range(hf["num_hidden_layers"])
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", *mlp)}
    assert set(layers) == set(seen) == want
    recipe = (llmc.DPQModifier(group_size=group, gar=True, scale_search="max") if name == "g64"
              else llmc.DPQModifier(group_size=group)).dpq_recipe()
    assert ("model.layers.0.mlp.gate.weight" in rest) == (name == "moe")  # the router stays unquantized

    for p, layer in layers.items():
        w, h = seen[p]
        if name != "moe":  # (the source stores experts fused, llm-compressor linearizes them)
            assert torch.equal(w, source[p + ".weight"]), p  # the untouched original weight
        ref = quantize_layer(w.float(), h, recipe)
        q = unpack_int4(layer.packed, layer.k)
        assert torch.equal(q, ref.qw.q), p  # the codes, bit for bit
        assert torch.equal(layer.scales, export_group_scales(ref.qw.weight_scale, ref.qw.group_scale)), p
        # the load-time fold (stock vLLM at g128, the DPQ plugin at every group size) gives back
        # exactly DPQ's FP8 group scales and channel scales, under either division
        for division in ("ieee", "reciprocal"):
            s8, chan = fold_group_scales(layer.scales, division)
            assert torch.equal(s8.float(), ref.qw.group_scale.float()), p
            assert torch.equal(chan.reshape(-1), ref.qw.weight_scale), p
        assert torch.equal(folded_effective_weight(q, layer.scales, group), ref.w_eff), p

    for n, t in rest.items():  # everything else saved unchanged (embeddings, norms)
        assert torch.equal(t, source[n]), n


def test_hessian_is_llmcompressors_per_sequence_average(ckpts):
    """Layer 0's q_proj sees the first norm of the embeddings (no quantized layer before it):
    its Hessian is 2 X^T X / (number of sequences), llm-compressor's normalisation."""
    from transformers import AutoModelForCausalLM

    src, _, seen = ckpts["g128"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(calibration_ids())).float()
    x = x.reshape(-1, x.shape[-1])
    h = seen["model.layers.0.self_attn.q_proj"][1]
    torch.testing.assert_close(h, 2 * x.t() @ x / SAMPLES, rtol=1e-4, atol=1e-3)


if __name__ == "__main__":  # python tests/llmcompressor_venv/test_dpq_modifier.py OUT: the checkpoints, for serving
    made = make_checkpoints(Path(sys.argv[1]))
    print(json.dumps({name: str(path) for name, (_, path, _) in made.items()}))
