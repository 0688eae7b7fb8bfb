"""Greedy generation from a DPQ checkpoint, through vLLM or the reference forward: the model's
chat template where it has one (else plain completion), a context length the model allows."""

from __future__ import annotations

import os

DEFAULT_MAX_MODEL_LEN = 2048  # the context asked of vLLM when the model allows more (KV cache on a small CPU)
SHUTDOWN_TIMEOUT = 30  # s, at most, for the engine's processes to exit on their own at the end


class GenerateError(ValueError):
    """A generation request the model cannot serve (one line for the user, no traceback)."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. a mismatched torchvision)
        return False
    return True


def cpu_engine_defaults() -> dict:
    """LLM() arguments that start on a small CPU machine, in the CPU's fast dtype: float32
    where bf16 is not native (AVX2 only: bf16 matmuls ~40x slower), else the model's own
    (see docs/SERVING.md)."""
    import torch

    from vllm_dpq.kernels.cpu import fast_dtype

    if torch.cuda.is_available():
        return {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {"gpu_memory_utilization": 0.3, **({"dtype": "float32"} if fast_dtype() == torch.float32 else {})}


def use_chat(tokenizer, chat: bool | None) -> bool:
    """Whether the prompts go through the tokenizer's chat template: ``chat`` None (auto) where it
    has one, plain completion where it has none (a base model); True where it has none is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise GenerateError("this model's tokenizer has no chat template (a base model?): "
                            "leave out --chat, or pass --no-chat, for plain completion")
    return has_template if chat is None else chat


def model_max_len(checkpoint: str, requested: int | None = None, dtype: str | None = None) -> int:
    """The context length to ask of vLLM: ``requested`` if the model allows it, else (None) the
    model's own limit as vLLM derives it (config.json, tokenizer, RoPE scaling) capped at
    DEFAULT_MAX_MODEL_LEN. Asking for more than the model allows is a GenerateError. The model
    config built here is what LLM() builds next (vLLM caches the costly part in the process)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    if requested is not None and requested < 1:
        raise GenerateError(f"--max-model-len must be a positive number of tokens, got {requested}")
    load_general_plugins()  # the "dpq" quantization method, as LLM() registers it
    limit = EngineArgs(model=checkpoint, **({"dtype": dtype} if dtype else {})).create_model_config().max_model_len
    if requested is None:
        return min(limit, DEFAULT_MAX_MODEL_LEN)
    if requested > limit:
        raise GenerateError(f"--max-model-len {requested} is more than this model allows ({limit} tokens, "
                            f"from its config.json and tokenizer)")
    return requested


def generate(checkpoint: str, prompts: list[str], max_tokens: int = 64, engine: str = "auto",
             max_model_len: int | None = None, chat: bool | None = None) -> list[str]:
    """Greedy completions of ``prompts``; ``chat`` and ``max_model_len`` as in use_chat and
    model_max_len (``max_model_len``: the vLLM engine only)."""
    if engine == "auto":
        engine = "vllm" if vllm_available() else "reference"
    if engine == "vllm":
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        chat = use_chat(AutoTokenizer.from_pretrained(checkpoint), chat)  # before the engine starts
        args = {"enforce_eager": True, **cpu_engine_defaults()}
        # the engine core waits this long for its worker to exit (vLLM's 5 s: cut short on a busy CPU)
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(SHUTDOWN_TIMEOUT))
        llm = LLM(checkpoint, max_model_len=model_max_len(checkpoint, max_model_len, args.get("dtype")), **args)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            if chat:
                outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
            else:
                outs = llm.generate(prompts, params, use_tqdm=False)
            return [o.outputs[0].text for o in outs]
        finally:
            # stop the engine core now, and give it the time to stop its worker: left to
            # interpreter exit (or vLLM's 5 s), it is killed and vLLM reports "engine core exited
            # unexpectedly" or force-kills it
            llm.llm_engine.engine_core.shutdown(timeout=2 * SHUTDOWN_TIMEOUT)

    import torch

    from vllm_dpq.reference import load_reference_model

    model, tok = load_reference_model(checkpoint)
    chat = use_chat(tok, chat)
    texts = []
    for p in prompts:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
