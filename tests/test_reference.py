"""The reference forward of a DPQ checkpoint: exact numerics, close to the BF16 model."""

import pytest
import torch

from conftest import make_checkpoint
from vllm_dpq.numerics import reference_linear
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


def test_w4a16_mode_differs_only_by_fp8(tmp_path):
    path, source = make_checkpoint(tmp_path / "ck")
    w4a8, _ = load_reference_model(path)
    w4a16, _ = load_reference_model(path, mode="w4a16")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, ref = w4a8(ids).logits, w4a16(ids).logits, source(ids).logits
    assert not torch.equal(a, b)
    assert ((b - ref).norm() / ref.norm()) < 0.25
