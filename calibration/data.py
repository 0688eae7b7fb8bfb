"""Calibration data: text from files, folders, JSONL or a Hugging Face dataset, cut into
token windows drawn at random with a fixed seed.

Sources (``--data``):
  path/to/file.txt             one text file
  path/to/folder               every *.txt, *.md, *.jsonl in it, sorted by name
  path/to/file.jsonl           one JSON object per line; the text is ``--text-field`` (default "text")
  hf:NAME[:CONFIG][:SPLIT]     a Hugging Face dataset (needs ``datasets`` and network access)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calibration import CalibrationError
from vllm_dpq.evaluate import text_ids

TEXT_SUFFIXES = (".txt", ".md", ".text")


class DataError(CalibrationError):
    """Calibration data is missing, empty or too short."""


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise DataError(f"{path}:{i}: no string field {field!r} (set --text-field)")
            texts.append(obj[field])
    return "\n\n".join(texts)


def _read_hf(spec: str, field: str) -> str:
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: install the 'datasets' package to use Hugging Face datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...: the library's own message
        raise DataError(f"{spec}: cannot load dataset ({type(e).__name__}: {e})") from None
    if field not in ds.column_names:
        raise DataError(f"{spec}: no column {field!r}; columns are {ds.column_names} (set --text-field)")
    return "\n\n".join(t for t in ds[field] if t)


def read_text(source: str, text_field: str = "text") -> str:
    """All calibration text of a source, concatenated."""
    if source.startswith("hf:"):
        text = _read_hf(source, text_field)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES + (".jsonl",))
            if not files:
                raise DataError(f"{path}: no .txt/.md/.jsonl files in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{source}: no such file or folder")
        text = "\n\n".join(_read_jsonl(f, text_field) if f.suffix == ".jsonl" else f.read_text(encoding="utf-8")
                           for f in files)
    if not text.strip():
        raise DataError(f"{source}: the calibration text is empty")
    return text


def token_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at random offsets (torch.Generator(seed))."""
    if num_samples <= 0 or seq_len <= 0:
        raise DataError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    if ids.numel() < seq_len:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_windows(tokenizer, source: str, num_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, text_field: str = "text") -> torch.Tensor:
    """[num_samples, seq_len] int64 token ids (no special tokens added)."""
    text = read_text(source, text_field)
    ids = torch.tensor(text_ids(tokenizer, text), dtype=torch.long)
    return token_windows(ids, num_samples, seq_len, seed)
