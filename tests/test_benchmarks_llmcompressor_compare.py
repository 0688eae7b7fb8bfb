"""benchmarks/llmcompressor_compare.py refuses, before any calibration, a group size that
llm-compressor would refuse: K not a multiple of it (SmolLM2's 576 at the W4AFP8 preset's 128).
The benchmark itself (two venvs, minutes) is not run here."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import tiny_config


def test_group_size_must_divide_every_quantized_k(tmp_path):
    from benchmarks.llmcompressor_compare import check_group_size, linear_ks, main

    tiny_config(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1).save_pretrained(tmp_path)
    ks = linear_ks(tmp_path)  # q, k, v, o, gate, up read the hidden size (o: 3 heads x 64), down the MLP's; no lm_head
    assert {k: len(v) for k, v in ks.items()} == {192: 12, 512: 2}
    assert "model.layers.0.self_attn.o_proj" in ks[192] and "model.layers.1.mlp.down_proj" in ks[512]
    check_group_size(tmp_path, 64)  # 192 = 3 x 64, 512 = 8 x 64
    check_group_size(tmp_path, 256)  # K below the group is one group (llm-compressor allows it); 512 = 2 x 256
    with pytest.raises(SystemExit, match=r"--group-size 128: .* K = 192 \(12 layers .*group sizes that fit: \[64, 32\]"):
        check_group_size(tmp_path, 128)
    # main() checks it before starting any child (the interpreter given is never run)
    with pytest.raises(SystemExit, match="--group-size 128"):
        main(["--model", str(tmp_path), "--group-size", "128", "--llmc-python", sys.executable])
