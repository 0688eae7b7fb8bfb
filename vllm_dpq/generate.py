"""Greedy generation from a DPQ checkpoint, through vLLM or the reference forward: each prompt is a
user turn of the checkpoint's chat template, or, for a model with none (a base model such as
Gemma-3-270M), text to continue (the tokenizer's own special tokens added, e.g. Gemma's <bos>)."""

from __future__ import annotations

import os


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


def generate(checkpoint: str, prompts: list[str], max_tokens: int = 64, engine: str = "auto") -> list[str]:
    if engine == "auto":
        engine = "vllm" if vllm_available() else "reference"
    if engine == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(checkpoint, max_model_len=2048, enforce_eager=True, **cpu_engine_defaults())
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        if getattr(llm.get_tokenizer(), "chat_template", None):
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    import torch

    from vllm_dpq.reference import load_reference_model

    model, tok = load_reference_model(checkpoint)
    texts = []
    for p in prompts:
        if tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
