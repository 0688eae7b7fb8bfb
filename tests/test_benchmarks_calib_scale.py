"""benchmarks/calib_scale.py and its model builder: the synthetic shards load in transformers,
the child's peak RSS is its own, and the report (depth check, formula fit, table, JSON, plot)
works on made-up results. The benchmark itself is not run here."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import pytest
import torch

from tests.conftest import corpus


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_synthetic_model_is_a_sharded_hf_folder(tmp_path, qkv_bias):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.synthetic_model import Shape, build_model, main

    shape = Shape(hidden=128, intermediate=320, heads=2, kv_heads=1, layers=3, vocab=4200, qkv_bias=qkv_bias)
    limit = 1 << 20
    folder = build_model(tmp_path / "m", shape, corpus("austen_sensesensibility.txt"), max_shard_bytes=limit)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert sorted(index["weight_map"]) == sorted(name for name, _ in shape.tensors())
    sizes = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as sf:
            tensors = [sf.get_tensor(k) for k in sf.keys()]
        assert all(t.dtype == torch.bfloat16 for t in tensors)
        sizes[f] = sum(t.numel() * 2 for t in tensors)
        assert sizes[f] <= limit or len(tensors) == 1  # only a tensor larger than a shard overflows
    assert index["metadata"]["total_size"] == sum(sizes.values()) == shape.params() * 2

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) == shape.params()
    name = "model.layers.2.mlp.down_proj.weight"
    with safe_open(str(folder / index["weight_map"][name]), "pt") as sf:
        assert torch.equal(model.get_parameter(name), sf.get_tensor(name))
    ids = AutoTokenizer.from_pretrained(folder)("Elinor and Marianne", return_tensors="pt").input_ids
    assert ids.numel() > 2 and int(ids.max()) < shape.vocab
    assert model(ids).logits.isfinite().all()

    stamp = (folder / files[0]).stat().st_mtime_ns  # same shape: reused; another seed: rebuilt
    assert main([str(folder), "--shape", json.dumps(asdict(shape)), "--data", str(corpus("austen_sensesensibility.txt")),
                 "--max-shard-bytes", str(limit)]) == 0  # the command the benchmark runs
    assert (folder / files[0]).stat().st_mtime_ns == stamp
    build_model(folder, shape, corpus("austen_sensesensibility.txt"), seed=1, max_shard_bytes=limit)
    with safe_open(str(folder / index["weight_map"][name]), "pt") as sf:
        assert not torch.equal(model.get_parameter(name), sf.get_tensor(name))


def test_reference_configs_have_their_published_sizes():
    from benchmarks.calib_scale import REFERENCE_MODELS

    assert REFERENCE_MODELS["Llama-3-70B"].params() == pytest.approx(70.55e9, rel=0.002)
    assert REFERENCE_MODELS["Qwen2.5-72B"].params() == pytest.approx(72.71e9, rel=0.002)


def test_run_measured_reports_each_childs_own_peak_rss(tmp_path):
    from benchmarks.calib_scale import run_measured

    big = run_measured([sys.executable, "-c", "import time; b = b'x' * (400 << 20); time.sleep(0.5); print('ok')"],
                       tmp_path / "a.log", 60)
    small = run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"], tmp_path / "b.log", 60)
    assert big["rc"] == small["rc"] == 0 and (tmp_path / "a.log").read_text() == "ok\n"
    assert big["max_rss_gib"] > 0.39 and 0 < small["max_rss_gib"] < 0.1  # its own, not the launcher's peak
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "c.log", 1)
    assert slow["rc"] == -9 and slow["wall_s"] < 20


def _fake_run(sweep, shape, peak_of):
    from benchmarks.calib_scale import sizes

    r = {"sweep": sweep, "shape": asdict(shape), "calib_dtype": "bfloat16", "wall_s": 10.0, "ru_maxrss_gib": 0,
         **sizes(shape, 1024, 2)}
    return {**r, "calibration_s": 5.0, "total_s": 8.0, "stats_peak_rss_gib": 0, "peak_rss_gib": peak_of(r)}


def test_report_fits_the_formula_and_checks_depth(tmp_path):
    from benchmarks.calib_scale import REFERENCE_MODELS, fit_formula, main, sizes, write
    from benchmarks.synthetic_model import llama_width

    def today(r):  # a made-up machine: whole model resident
        return 0.5 + 3.0 * r["layer_gib"] + 1.2 * r["model_gib"] + r["act_gib"]

    shapes = [("depth", llama_width(256, d)) for d in (4, 16, 64)] + [("width", llama_width(w, 4)) for w in (256, 512, 1024)]
    runs = [_fake_run(s, sh, today) for s, sh in shapes]
    runs.append({**runs[-1], "sweep": "width", "error": "exit code 1: MemoryError"})
    for k in ("calibration_s", "peak_rss_gib"):
        runs[-1].pop(k)
    results = {"setup": {"tokens": 1024}, "runs": runs,
               "compare": {"model": "m", "vllm_dpq": {"calibration_s": 5.0, "wall_s": 9.0, "peak_rss_gib": 1.0},
                           "llmcompressor": {"error": "not installed"}}}
    md = write(results, tmp_path)
    assert results["fit"]["coef"] == pytest.approx({"const": 0.5, "layer_gib": 3.0, "model_gib": 1.2}, rel=1e-6)
    assert results["fit"]["points"] == 5  # the model in both sweeps counts once, the failed run not at all
    llama = REFERENCE_MODELS["Llama-3-70B"]
    s = sizes(llama, 128 * 512, 2)
    assert results["predictions"]["Llama-3-70B"]["peak_rss_gib"] == pytest.approx(
        0.5 + 3.0 * s["layer_gib"] + 1.2 * s["model_gib"] + s["act_gib"])
    dc = results["depth_check"]
    assert (dc["shallow"], dc["deep"], dc["pass"]) == (4, 64, False) and dc["ratio"] > 1.1
    assert "64 layers / 4 layers" in md and "FAIL" in md and "| llm-compressor GPTQ (W4 g32) | not installed | |" in md and "failed: exit code 1" in md
    assert "Llama-3-70B" in md and "Qwen2.5-72B" in md and "0.500 + 3.000 * layer + 1.200 * model" in md
    assert json.loads((tmp_path / "calib_scale.json").read_text())["table"] == md
    assert (tmp_path / "calib_scale.md").read_text() == md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "calib_scale.png").stat().st_size > 0

    def streamed(r):  # bounded memory: the model size drops out
        return 0.6 + 4.0 * r["layer_gib"] + r["act_gib"]

    results = {"setup": {"tokens": 1024}, "runs": [_fake_run(s, sh, streamed) for s, sh in shapes],
               "compare": {"model": "m", "vllm_dpq": {"calibration_s": 5.0, "wall_s": 9.0, "peak_rss_gib": 1.0},
                           "llmcompressor": {"calibration_seconds": 10.0, "wall_s": 12.0, "peak_rss_gib": 1.0}}}
    (tmp_path / "calib_scale.json").write_text(json.dumps(results))
    assert main(["--report-only", "--out-dir", str(tmp_path)]) == 0  # re-rendered from the JSON
    md = (tmp_path / "calib_scale.md").read_text()
    assert "PASS" in md and "| llm-compressor GPTQ (W4 g32) | 10.0 | 12.0 | 1.00 |" in md
    assert "vllm-dpq / llm-compressor: 0.50 (goal <= 1.0)" in md
    fit = json.loads((tmp_path / "calib_scale.json").read_text())["fit"]
    assert fit["coef"] == pytest.approx({"const": 0.6, "layer_gib": 4.0, "model_gib": 0.0}, abs=1e-6)

    noisy = [_fake_run(s, sh, lambda r: 0.6 + 4.0 * r["layer_gib"] + r["act_gib"]) for s, sh in shapes]
    noisy[2]["peak_rss_gib"] -= 0.05  # the deepest model measured lower: a negative slope is not fitted
    fit = fit_formula(noisy)
    assert fit["coef"]["model_gib"] == 0.0 and fit["coef"]["layer_gib"] > 0
