"""The reference forward of a DPQ checkpoint: exact numerics, close to the BF16 model."""

import types

import pytest
import torch

from conftest import fp8, make_checkpoint
from vllm_dpq.numerics import QuantizedWeight, reference_linear
from vllm_dpq.reference import ReferenceW4A8Linear, load_reference_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_reference_close_to_bf16(tmp_path, arch, activations):
    path, source = make_checkpoint(tmp_path / "ck", arch, activations=activations, samples=16)
    model, _ = load_reference_model(path)
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = source(ids).logits
        out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.25, rel  # quantized: not identical, but close
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.6, agree
    # and the layers really are W4A8 modules computing the reference numerics
    layers = [m for m in model.modules() if isinstance(m, ReferenceW4A8Linear)]
    assert len(layers) == 14


def test_reference_layer_is_the_numerics(tmp_path):
    from vllm_dpq.format import read_checkpoint

    path, _ = make_checkpoint(tmp_path / "ck", activations="static")
    ck = read_checkpoint(path)
    name = "model.layers.1.mlp.down_proj"
    qw = ck.quantized(name)
    layer = ReferenceW4A8Linear(qw, 448.0, ck.input_scale(name), None)
    x = torch.randn(3, 5, 256)
    assert torch.equal(layer(x), reference_linear(x, qw, 448.0, ck.input_scale(name), out_dtype=torch.float32))


def w4a16_with_fp8_by_hand(layer: ReferenceW4A8Linear, x: torch.Tensor) -> torch.Tensor:
    """A w4a16 layer's forward with the two FP8 roundings of DPQ_SPEC section 1 applied by hand:
    its weight s_w * q * s_g becomes s_w * fp8(q * s_g), its input s_x * fp8(x / s_x)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if layer.input_scale is not None:
        s_x = layer.input_scale.reshape(1, 1)
    else:
        s_x = (x2.abs().amax(-1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    s_w = layer.weight_scale.reshape(1, -1)
    y = (fp8(x2 / s_x) @ fp8(layer.w / s_w.t()).t()) * s_x * s_w
    if layer.bias is not None:
        y = y + layer.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_w4a16_mode_differs_only_by_fp8(tmp_path, activations):
    """The w4a16 mode is the same codes and scales without the FP8 roundings: putting the FP8
    step back by hand into every w4a16 layer gives the w4a8 model's logits bit for bit."""
    path, source = make_checkpoint(tmp_path / "ck", activations=activations)
    w4a8, _ = load_reference_model(path)
    w4a16, _ = load_reference_model(path, mode="w4a16")
    by_hand, _ = load_reference_model(path, mode="w4a16")
    from vllm_dpq.format import read_checkpoint

    # w4a16 is the INT4 weight alone, s_w * q * s_g from the checkpoint: no FP8 rounding anywhere
    ck = read_checkpoint(path)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    for name, (n, k) in ck.layers.items():
        qw, layer = ck.quantized(name), w4a16.get_submodule(name)
        s_g = qw.group_scale.float()[:, torch.arange(k) // qw.group_size]
        weight = qw.weight_scale.reshape(-1, 1) * qw.q.float() * s_g
        assert torch.equal(layer.w, weight), name
        assert torch.equal(layer(x[:, :k]), x[:, :k] @ weight.t()), name
    layers = [m for m in by_hand.modules() if isinstance(m, ReferenceW4A8Linear)]
    assert len(layers) == 14
    for layer in layers:
        layer.forward = types.MethodType(w4a16_with_fp8_by_hand, layer)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c, ref = w4a8(ids).logits, w4a16(ids).logits, by_hand(ids).logits, source(ids).logits
    assert torch.equal(c, a)
    assert not torch.equal(a, b)  # the FP8 roundings do change the result
    assert ((b - ref).norm() / ref.norm()) < 0.25


def test_w4a16_equals_w4a8_where_fp8_rounding_is_the_identity():
    """Power-of-two group scales make every q * s_g an FP8 value, and inputs that are FP8 values
    times a power-of-two static scale quantize to themselves: then both modes agree exactly."""
    g = torch.Generator().manual_seed(3)
    n, k, group = 48, 96, 32
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    s_g = torch.exp2(torch.randint(-6, 0, (n, k // group), generator=g).float()).to(torch.bfloat16)
    qw = QuantizedWeight(q, s_g, torch.tensor([2.0**-3]), group)
    s_x = torch.tensor([2.0**-5])
    x = fp8(torch.randn(4, 7, k, generator=g) * 100) * s_x
    bias = torch.randn(n, generator=g)
    w4a8 = ReferenceW4A8Linear(qw, 448.0, s_x, bias)
    w4a16 = ReferenceW4A8Linear(qw, 448.0, s_x, bias, mode="w4a16")
    assert torch.equal(w4a8.w, fp8(w4a8.w))  # the premise: no FP8 rounding happens
    assert torch.equal(w4a8(x), w4a16(x))


def test_generate_continues_text_without_a_chat_template(tmp_path):
    """`vllm-dpq generate --engine reference` on a base model (no chat template, as Gemma-3-270M):
    the prompt is continued as text, tokenized with the tokenizer's own special tokens."""
    from conftest import save_tokenizer
    from transformers import AutoTokenizer

    from vllm_dpq.generate import generate

    path, _ = make_checkpoint(tmp_path / "ck")
    save_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert not tok.chat_template
    [text] = generate(str(path), ["The quick brown fox"], max_tokens=6, engine="reference")
    model, _ = load_reference_model(path)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) and len(out[0]) == ids.shape[1] + 6
