"""The `vllm-dpq quantize` command end to end on a tiny model saved to disk: bad input fails
early and clearly; a run killed at any layer resumes to a byte-identical checkpoint."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import corpus, make_checkpoint, save_tiny_model_dir

CLI = [sys.executable, "-m", "vllm_dpq.cli"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    text = corpus("austen_sensesensibility.txt").read_text()[:200_000]
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", layers=6, text=text)


def quantize(model, out, *extra, check=True, **kw):
    cmd = [*CLI, "quantize", str(model), str(out), "--data", str(corpus("austen_sensesensibility.txt")),
           "--num-samples", "16", "--seq-len", "128", "--method", "dpq", "--batch-size", "4", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, **kw)


def digest(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_quantize_and_inspect(tiny_dir, tmp_path):
    out = tmp_path / "ck"
    r = quantize(tiny_dir, out, "--activations", "static")
    # the whole calibration text is tokenized at once (far more than the tokenizer's
    # model_max_length of 512), then cut into windows: no warning about the length
    assert "longer than the specified maximum" not in r.stdout + r.stderr
    r = subprocess.run([*CLI, "inspect", str(out)], capture_output=True, text=True, check=True)
    assert "quantized layers 42" in r.stdout and "FP8 static" in r.stdout
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    # refuses to overwrite without --overwrite
    r = quantize(tiny_dir, out, check=False)
    assert r.returncode != 0 and "exists" in r.stderr


@pytest.mark.parametrize("weight_scale,line", [("tensor", "per tensor, power of two"),
                                               ("channel", "per channel, any positive fp32")])
def test_inspect_weight_scale_line(tmp_path, capsys, weight_scale, line):
    """A per-tensor s_w is a power of two (format invariant); a per-channel one need not be."""
    from vllm_dpq.cli import main

    path, _ = make_checkpoint(tmp_path / "ck", method="rtn", samples=2, weight_scale=weight_scale)
    assert main(["inspect", str(path)]) == 0
    (printed,) = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("weight scale")]
    assert printed.split(None, 2)[2] == line


def test_kill_and_resume_is_byte_identical(tiny_dir, tmp_path):
    """Sharded output (small shards): the shards, index and manifest are byte-identical too."""
    shards = ("--max-shard-size", "150KB")
    full = tmp_path / "full"
    quantize(tiny_dir, full, *shards)
    assert len(list(full.glob("model-*-of-*.safetensors"))) >= 3 and (full / "model.safetensors.index.json").exists()
    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.dpq-work"
    cmd = [*CLI, "quantize", str(tiny_dir), str(out), "--data", str(corpus("austen_sensesensibility.txt")),
           "--num-samples", "16", "--seq-len", "128", "--method", "dpq", "--batch-size", "4", *shards]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while not (work / "layer_0001.safetensors").exists():  # killed after >= 2 committed layers
            assert proc.poll() is None, "finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists(), "an interrupted run must not leave a checkpoint"
    r = quantize(tiny_dir, out, "--resume", *shards)
    assert "resuming after layer" in r.stderr
    assert digest(out) == digest(full)
    assert not work.exists()


def test_resume_refuses_other_settings(tiny_dir, tmp_path):
    out = tmp_path / "ck"
    work = tmp_path / ".ck.dpq-work"
    proc = subprocess.Popen([*CLI, "quantize", str(tiny_dir), str(out), "--data",
                             str(corpus("austen_sensesensibility.txt")), "--num-samples", "16", "--seq-len", "128",
                             "--method", "dpq"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (work / "fingerprint.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    r = quantize(tiny_dir, out, "--resume", "--group-size", "64", check=False)
    assert r.returncode != 0 and "other settings" in r.stderr


@pytest.mark.parametrize("case,args,message", [
    ("no data", ["--data", "/nonexistent/file.txt"], "no such file or folder"),
    ("too short", ["--seq-len", "100000000"], "fewer than one window"),
    ("bad group", ["--group-size", "0"], "group_size"),
    ("everything ignored", ["--ignore", "re:.*"], "no Linear layer"),
    ("gar and act", ["--gar", "--act-order"], "exclusive"),
    ("bad shard size", ["--max-shard-size", "lots"], "not a size"),
])
def test_bad_input_fails_clearly(tiny_dir, tmp_path, case, args, message):
    extra = list(args)
    r = quantize(tiny_dir, tmp_path / "ck", *extra, check=False)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_empty_data_and_unsupported_model(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    r = subprocess.run([*CLI, "quantize", str(tiny_dir), str(tmp_path / "ck"), "--data", str(empty)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "empty" in r.stderr and "Traceback" not in r.stderr
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    r = subprocess.run([*CLI, "quantize", str(gpt2), str(tmp_path / "ck2"), "--data", str(empty)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "not supported" in r.stderr and "Traceback" not in r.stderr


def test_generate_chat_or_plain_completion(tiny_dir):
    """`vllm-dpq generate`'s choice: the chat template where the tokenizer has one (auto), plain
    completion where it has none; --chat without a template is a one-line error, --no-chat wins."""
    from transformers import AutoTokenizer

    from vllm_dpq.generate import GenerateError, use_chat

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert not tok.chat_template
    assert use_chat(tok, None) is False and use_chat(tok, False) is False
    with pytest.raises(GenerateError, match="no chat template.*--no-chat"):
        use_chat(tok, True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert use_chat(tok, None) is True and use_chat(tok, True) is True and use_chat(tok, False) is False


def recipe_of(*argv):
    import argparse

    from calibration.cli import add_arguments, recipe_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    return recipe_from_args(p.parse_args(["model", "out", "--data", "text.txt", *argv]))


def test_default_recipe_is_gar_with_asymmetric_calibration():
    default = recipe_of()
    assert (default.method, default.order, default.asym) == ("dpq", "gar", True)
    assert default == recipe_of("--gar", "--asym-calib")  # what the accuracy rows spell out
    plain = recipe_of("--no-gar", "--no-asym-calib")
    assert (plain.order, plain.asym) == ("none", False) and plain != default
    assert recipe_of("--act-order").order == "act"
    # standard GPTQ and RTN stay what their users know
    for method in ("gptq", "rtn"):
        r = recipe_of("--method", method)
        assert (r.order, r.asym) == ("none", False)
    # the paper's recipe has neither lever unless asked; explicit choices win
    paper = recipe_of("--paper-recipe")
    assert (paper.order, paper.asym, paper.scale_search, paper.codes) == ("none", False, "max", "round")
    assert (recipe_of("--paper-recipe", "--gar").order, recipe_of("--paper-recipe", "--asym-calib").asym) == ("gar", True)


def test_ppl_windows_with_bos(tiny_dir):
    """--bos: each window is BOS + the next seq_len - 1 tokens of the text (the same tokens in the
    same order as without it), and a tokenizer without a BOS token is refused by name."""
    from transformers import AutoTokenizer

    from vllm_dpq.evaluate import text_windows

    text = corpus("austen_prideprejudice.txt")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    plain, with_bos = text_windows(tok, text, 64, 4), text_windows(tok, text, 64, 4, bos=True)
    assert with_bos.shape == plain.shape == (4, 64)
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    assert with_bos[:, 1:].flatten().tolist() == plain.flatten()[: 4 * 63].tolist()
    tok.bos_token = None
    with pytest.raises(ValueError, match="no BOS token"):
        text_windows(tok, text, 64, 4, bos=True)
    ppl = [float(subprocess.run([*CLI, "ppl", str(tiny_dir), "--bf16", "--text", str(text), "--seq-len", "64",
                                 "--windows", "2", *flag], capture_output=True, text=True, check=True).stdout.split()[-1])
           for flag in ([], ["--bos"])]
    assert all(p > 1 for p in ppl) and ppl[0] != ppl[1]
    # a text too short for one window is a clear CLI error, not a traceback
    short = tiny_dir.parent / "short.txt"
    short.write_text("Too short.")
    r = subprocess.run([*CLI, "ppl", str(tiny_dir), "--bf16", "--text", str(short), "--bos"], capture_output=True, text=True)
    assert r.returncode == 2 and "fewer than 511 tokens" in r.stderr and "Traceback" not in r.stderr
