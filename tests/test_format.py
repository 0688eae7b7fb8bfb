"""Checkpoint write/read round trip on tiny Llama and Qwen models; every corruption gives a
clear error naming what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint
from vllm_dpq.format import MANIFEST, CheckpointError, file_digest, read_checkpoint


@pytest.fixture(scope="module")
def ckpt_llama(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ck") / "llama", "llama", activations="static")
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_roundtrip(tmp_path, arch, activations):
    from calibration.algorithms import Recipe
    from calibration.pipeline import calibrate
    from conftest import tiny_model
    from vllm_dpq.numerics import Scheme

    path, _ = make_checkpoint(tmp_path / "ck", arch, activations=activations)
    ck = read_checkpoint(path)
    assert ck.config.scheme.activation_scheme == activations
    names = {n for n, m in tiny_model(arch).named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    assert set(ck.layers) == names  # every decoder Linear, nothing else (lm_head stays)
    assert "lm_head" in ck.config.ignore
    # the stored codes/scales are exactly what the pipeline produced
    model = tiny_model(arch)
    scheme = Scheme(group_size=32, activation_scheme=activations)
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    result = calibrate(model, ids, Recipe(method="rtn", scheme=scheme), ["lm_head"], progress=False)
    for name, layer in result.layers.items():
        qw = ck.quantized(name)
        assert torch.equal(qw.q, layer.qw.q)
        assert torch.equal(qw.group_scale, layer.qw.group_scale)
        assert torch.equal(qw.weight_scale, layer.qw.weight_scale)
        s_x = ck.input_scale(name)
        assert (s_x is None) == (activations == "dynamic")
        if s_x is not None:
            assert s_x.item() == pytest.approx(layer.input_amax / 448.0)
    if arch == "qwen2":  # q/k/v biases survive
        assert any(n.endswith("q_proj.bias") for n in ck.tensors)


def corrupt(src, dst, fn, sync_scheme=True):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    manifest = json.loads((dst / MANIFEST).read_text())
    fn(tensors, config, manifest)
    if sync_scheme:  # keep the manifest's record of the numerics in step with config.json
        q = config["quantization_config"]
        manifest["scheme"] = {k: q.get(k) for k in manifest["scheme"]}
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    # re-sign the file hashes, so that the deeper checks (not the hash) are what is tested
    f = dst / "model.safetensors"
    manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)}}
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


L0 = "model.layers.0.self_attn.q_proj"


def _set(d, k, v):
    d[k] = v


CASES = {
    "missing tensor": (lambda t, c, m: t.pop(f"{L0}.weight_group_scale"), f"missing tensor {L0}.weight_group_scale"),
    "wrong dtype": (lambda t, c, m: _set(t, f"{L0}.weight_packed", t[f"{L0}.weight_packed"].to(torch.int64)), "dtype torch.int64"),
    "wrong shape": (lambda t, c, m: _set(t, f"{L0}.weight_group_scale", t[f"{L0}.weight_group_scale"][:, :2].contiguous()), "shape"),
    "nan scale": (lambda t, c, m: t[f"{L0}.weight_scale"].fill_(float("nan")), "not finite"),
    "inf scale": (lambda t, c, m: t[f"{L0}.input_scale"].fill_(float("inf")), "not finite"),
    "zero scale": (lambda t, c, m: t[f"{L0}.weight_group_scale"].view(-1)[0].fill_(0), "not positive"),
    "negative scale": (lambda t, c, m: t[f"{L0}.input_scale"].fill_(-1), "not positive"),
    "group scale too large": (lambda t, c, m: t[f"{L0}.weight_group_scale"].view(-1)[3].fill_(60.0), "exceeds fp8_max"),
    "weight scale not a power of two": (lambda t, c, m: t[f"{L0}.weight_scale"].mul_(1.5), "per-tensor weight scale is not a power of two"),
    "unknown version": (lambda t, c, m: c["quantization_config"].update(format_version=99), "format_version 99"),
    "bad group size": (lambda t, c, m: c["quantization_config"].update(group_size=0), "group_size"),
    "group size disagrees": (lambda t, c, m: c["quantization_config"].update(group_size=64), "weight_group_scale: shape"),
    "dynamic with input_scale": (lambda t, c, m: c["quantization_config"].update(activation_scheme="dynamic"), "config and tensors disagree"),
    "static without input_scale": (lambda t, c, m: t.pop(f"{L0}.input_scale"), f"missing tensor {L0}.input_scale"),
    "manifest shape": (lambda t, c, m: _set(m["layers"][L0], "shape", [128, 256]), "shape"),
    "manifest missing layer": (lambda t, c, m: m["layers"].pop(L0), "not in dpq_manifest.json"),
    "quant method": (lambda t, c, m: c["quantization_config"].update(quant_method="gptq"), "quant_method"),
    "both weights": (lambda t, c, m: _set(t, f"{L0}.weight", torch.zeros(128, 128)), "both a quantized and an unquantized"),
    "nan in the embedding": (lambda t, c, m: t["model.embed_tokens.weight"].view(-1)[7].fill_(float("nan")),
                             "tensor model.embed_tokens.weight: contains NaN or Inf"),
    "inf in a norm": (lambda t, c, m: t["model.layers.1.post_attention_layernorm.weight"].view(-1)[0].fill_(float("inf")),
                      "tensor model.layers.1.post_attention_layernorm.weight: contains NaN or Inf"),
    "hidden_size disagrees": (lambda t, c, m: c.update(hidden_size=256), "tensor model.embed_tokens.weight: shape"),
    "vocab_size disagrees": (lambda t, c, m: c.update(vocab_size=1024), "tensor model.embed_tokens.weight: shape"),
    "intermediate_size disagrees": (lambda t, c, m: c.update(intermediate_size=512),
                                    "layer model.layers.0.mlp.gate_proj: "),
    "config has a layer more": (lambda t, c, m: c.update(num_hidden_layers=3),
                                "tensor model.layers.2.self_attn.q_proj.weight: missing"),
    "config has a layer less": (lambda t, c, m: c.update(num_hidden_layers=1),
                                "layer model.layers.1.mlp.down_proj: in dpq_manifest.json, not in config.json's model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_is_a_clear_error(ckpt_llama, tmp_path, case):
    fn, message = CASES[case]
    bad = corrupt(ckpt_llama, tmp_path / "bad", fn)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_checkpoint(bad)


def test_config_and_manifest_disagree(ckpt_llama, tmp_path):
    bad = corrupt(ckpt_llama, tmp_path / "bad", lambda t, c, m: c["quantization_config"].update(group_size=33),
                  sync_scheme=False)
    with pytest.raises(CheckpointError, match="disagree on the numerics \\(group_size\\)"):
        read_checkpoint(bad)


def test_truncated_and_missing_files(ckpt_llama, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(ckpt_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: size .* differs from the manifest"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        read_checkpoint(bad, verify=False)  # even unverified, safetensors' own parser refuses it
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists tensor files"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_checkpoint(bad, verify=False)
    shutil.copytree(ckpt_llama, tmp_path / "nomani")
    (tmp_path / "nomani" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(tmp_path / "nomani")
    (tmp_path / "nomani" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path / "nomani")


def test_flipped_byte_is_detected(ckpt_llama, tmp_path):
    bad = tmp_path / "flip"
    shutil.copytree(ckpt_llama, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100] ^= 0x10  # somewhere in the tensor data: structurally still valid
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        read_checkpoint(bad)


def test_inspect_prints_layers(ckpt_llama, capsys):
    from vllm_dpq.cli import main

    assert main(["inspect", str(ckpt_llama)]) == 0
    out = capsys.readouterr().out
    assert "format version   1" in out and "group size       32" in out
    assert f"{L0}" in out and "[128, 128]" in out and "s_g range" in out


def test_inspect_rejects_bad_checkpoint(tmp_path, capsys):
    from vllm_dpq.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no quantization_config" in capsys.readouterr().err
