"""Calibration streams: the source model is read one decoder layer at a time, the checkpoint is
written one tensor at a time into shards, so host memory does not grow with the model's depth;
and the streamed result is exactly what calibrating the whole model in memory gives."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import corpus, save_tiny_model_dir

DATA = "austen_sensesensibility.txt"


def test_streamed_equals_in_memory(tmp_path):
    """The CLI (streamed in, sharded out) writes the tensors an in-memory run of the same
    pipeline writes, from a sharded bf16 source."""
    from transformers import AutoModelForCausalLM

    from calibration.algorithms import Recipe
    from calibration.data import calibration_windows
    from calibration.pipeline import calibrate
    from calibration.writer import save_checkpoint
    from vllm_dpq.cli import main
    from vllm_dpq.format import DPQConfig, read_checkpoint
    from vllm_dpq.shards import TensorFiles

    text = corpus(DATA)
    src = save_tiny_model_dir(tmp_path / "src", layers=3, text=text.read_text()[:100_000], dtype=torch.bfloat16,
                              max_shard_size="100KB", tie_word_embeddings=False)
    assert (src / "model.safetensors.index.json").exists()
    streamed = tmp_path / "streamed"
    assert main(["quantize", str(src), str(streamed), "--data", str(text), "--num-samples", "8", "--seq-len", "64",
                 "--calib-dtype", "float32", "--max-shard-size", "100KB", "--ignore", "down_proj"]) == 0
    assert len(list(streamed.glob("model-*.safetensors"))) > 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    samples = calibration_windows(tok, str(text), 8, 64, 0, "text")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ignore = ["lm_head", "down_proj"]
    result = calibrate(model, samples, Recipe(), ignore, progress=False)
    whole = save_checkpoint(tmp_path / "whole", model, tok, result, DPQConfig(Recipe().scheme, ignore))

    a, b = TensorFiles(streamed), TensorFiles(whole)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    ck = read_checkpoint(streamed)
    assert ck.config.ignore == read_checkpoint(whole).config.ignore == [
        "lm_head", *(f"model.layers.{i}.mlp.down_proj" for i in range(3))]


CHILD = """
import json, sys
import vllm_dpq.cli
from calibration.cli import peak_rss_bytes
rc = vllm_dpq.cli.main(sys.argv[1:])
print("RESULT", json.dumps({"rc": rc, "peak": peak_rss_bytes()}))
"""


def peak_rss_of_quantize(tmp_path, layers: int) -> tuple[int, int]:
    """(peak RSS in bytes of `vllm-dpq quantize` in a fresh process, the model's fp32 bytes)
    for a model of hidden 512 with this many layers, stored as bf16 shards."""
    from vllm_dpq.shards import TensorFiles

    src = save_tiny_model_dir(tmp_path / f"src{layers}", layers=layers, text=corpus(DATA).read_text()[:100_000],
                              dtype=torch.bfloat16, max_shard_size="50MB", hidden_size=512, intermediate_size=1536,
                              num_attention_heads=8, num_key_value_heads=2)
    out = tmp_path / f"ck{layers}"
    r = subprocess.run([sys.executable, "-c", CHILD, "quantize", str(src), str(out), "--data", str(corpus(DATA)),
                        "--method", "rtn", "--scale-search", "max", "--num-samples", "8", "--seq-len", "64",
                        "--calib-dtype", "float32", "--max-shard-size", "20MB"],
                       capture_output=True, text=True, timeout=1200)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(line[7:])
    assert res["rc"] == 0, r.stderr[-3000:]
    assert (len(list(out.glob("model-*-of-*.safetensors"))) > 1) == (layers > 4)
    fp32_bytes = sum(4 * info.nbytes // info.dtype.itemsize for info in TensorFiles(src).info.values())
    return res["peak"], fp32_bytes


def test_host_memory_does_not_grow_with_depth(tmp_path):
    """4 and 44 layers of hidden 512: 40 more layers are 460 MiB more in fp32 (the calibration
    dtype here), all of which a whole-model load adds to peak RSS; streaming must add less
    than 15% of it. Peak RSS varies by about +-30 MiB from run to run at any depth (seen at 4
    and 24 layers: 658-674 and 660-690 MiB), hence the depth."""
    (small, small_bytes), (big, big_bytes) = (peak_rss_of_quantize(tmp_path, n) for n in (4, 44))
    extra = big_bytes - small_bytes
    print(f"peak RSS {small / 2**20:.0f} MiB at 4 layers, {big / 2**20:.0f} MiB at 44 (+{extra / 2**20:.0f} MiB "
          "of fp32 weights)")
    assert big - small < 0.15 * extra, (small, big, extra)
