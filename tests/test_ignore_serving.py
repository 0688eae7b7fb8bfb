"""`--ignore` patterns (a name suffix, a glob, a regex) resolve to the concrete names of the
layers calibration skipped; vLLM serves each checkpoint with exactly those layers unquantized
(their plain weights loaded, the rest W4A8), agreeing with the reference forward. All three
checkpoints are served by one process (tests/test_plugin_engine.py's child), one engine after
another (in that process: nothing spawned)."""

from __future__ import annotations

import pytest

import engine
from conftest import save_tiny_model_dir
import test_plugin_engine
from test_plugin_engine import MAX_TOKENS, reference_logprobs

PATTERNS = {
    "suffix": ("down_proj", {f"model.layers.{i}.mlp.down_proj" for i in range(2)}),
    # a glob naming all of q/k/v: vLLM fuses them into one layer of one scheme (a checkpoint
    # ignoring only some of them is refused at load, naming the fused layer)
    "glob": ("model.layers.*.self_attn.[qkv]_proj", {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2)
                                                     for p in "qkv"}),
    "regex": (r"re:model\.layers\.1\.mlp\.", {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}),
}


@pytest.mark.slow
def test_ignore_patterns_are_served_as_calibrated(tmp_path):
    pytest.importorskip("vllm")
    from vllm_dpq.format import read_checkpoint

    src = save_tiny_model_dir(tmp_path / "src", layers=2)
    ckpts = {}
    for kind, (pattern, skipped) in PATTERNS.items():
        ckpts[kind] = engine.quantize(src, tmp_path / kind, "--ignore", pattern, "--seq-len", "64")
        ck = read_checkpoint(ckpts[kind])
        assert ck.config.ignore == sorted({"lm_head", *skipped}), kind
        assert ck.config.calibration["ignore"] == ["lm_head", pattern]
        assert all(f"{name}.weight" in ck.tensors for name in skipped) and not skipped & set(ck.layers)

    run = engine.run_engine(test_plugin_engine.__file__, {"models": {k: str(v) for k, v in ckpts.items()}}, tmp_path / "job",
                            engine.engine_env(backend="cpu", apply_model=True, in_process=True))
    results = run.ok()
    for kind, path in ckpts.items():
        tokens, logprobs = results[kind]["tokens"], results[kind]["logprobs"]
        ref = reference_logprobs(path, tokens)
        for toks, lps, ref_lp in zip(tokens, logprobs, ref):
            assert len(toks) == MAX_TOKENS
            for step, (t, lp) in enumerate(zip(toks, lps)):
                gap = ref_lp[step].max().item() - ref_lp[step, t].item()
                assert gap < 0.5 and abs(lp - ref_lp[step, t].item()) < 1.0, (kind, step, gap, lp)

