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


class TextWindowsError(ValueError):
    """The text or tokenizer cannot give the evaluation windows asked for (a user error)."""


def text_windows(tokenizer, text_path: str | Path, seq_len: int = 512, num_windows: int = 64,
                 bos: bool = False) -> torch.Tensor:
    """The first ``num_windows`` windows of ``seq_len`` tokens of a text, no special tokens
    (EVAL_PROTOCOL). ``bos``: each window is the tokenizer's BOS token and ``seq_len - 1`` text
    tokens, for models trained to see BOS first (Gemma's perplexity without it is meaningless)."""
    if bos and tokenizer.bos_token_id is None:
        raise TextWindowsError("bos=True: this tokenizer has no BOS token")
    ids = text_ids(tokenizer, Path(text_path).read_text(encoding="utf-8"))
    width = seq_len - 1 if bos else seq_len
    n = min(num_windows, len(ids) // width)
    if n == 0:
        raise TextWindowsError(f"{text_path}: fewer than {width} tokens")
    windows = torch.tensor(ids[: n * width], dtype=torch.long).reshape(n, width)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


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
