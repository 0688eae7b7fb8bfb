"""Perplexity, as docs/EVAL_PROTOCOL.md states it: the whole text tokenized without special
tokens, non-overlapping windows, PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def text_ids(tokenizer, text: str) -> list[int]:
    """A whole text as token ids, no special tokens, without the tokenizer's "sequence length is
    longer than the specified maximum" warning: the ids are cut into windows of at most the
    model's length afterwards (here and in calibration)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def text_windows(tokenizer, text_path: str | Path, seq_len: int = 512, num_windows: int = 64) -> torch.Tensor:
    ids = text_ids(tokenizer, Path(text_path).read_text(encoding="utf-8"))
    n = min(num_windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"{text_path}: fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="ppl", disable=not progress):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
