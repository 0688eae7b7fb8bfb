"""Calibration data: text from files, folders, JSONL or a Hugging Face dataset, cut into
token windows drawn at random with a fixed seed.

Sources (``--data``):
  path/to/file.txt             one text file
  path/to/folder               every *.txt, *.md, *.jsonl in it, sorted by name
  path/to/file.jsonl           one JSON object per line; the text is ``--text-field`` (default "text")
  hf:NAME[:CONFIG][:SPLIT]     a Hugging Face dataset (needs ``datasets`` and network access)

Several sources are mixed (``--data A:0.7 --data B:0.3``): SOURCE:SHARE gives SHARE of the
calibration windows (so of its tokens) to SOURCE, drawn from that source alone. Shares are
numbers in (0, 1] summing to 1; with none given, every source gets an equal share. A source
that exists as a path is never split at a colon.

BOS: a window starts with the tokenizer's BOS token (then ``seq_len - 1`` text tokens) when the
tokenizer puts one before every text it encodes (Gemma's does; Llama/SmolLM2's and Qwen's do not),
so the layers are calibrated on the inputs they see in use: a model trained with BOS first reads
a window without it as a different distribution (``--bos`` / ``--no-bos`` override).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Source:
    """One ``--data`` value: where the text is, and its share of the windows (None: not given)."""

    spec: str
    share: float | None = None

    @property
    def name(self) -> str:
        """What the checkpoint records: a file or folder's name (no machine path), or the hf: spec."""
        return self.spec if self.spec.startswith("hf:") else Path(self.spec).name

    @classmethod
    def parse(cls, value: str) -> "Source":
        """SOURCE or SOURCE:SHARE (the trailing :NUMBER is a share unless VALUE is an existing path)."""
        head, sep, tail = value.rpartition(":")
        if Path(value).exists() or not (sep and head) or "/" in tail:
            return cls(value)
        if not _looks_numeric(tail):
            if Path(head).exists() or head.startswith("hf:") and head.count(":") >= 3:
                raise DataError(f"--data {value}: share {tail!r} is not a number (SOURCE:SHARE, e.g. {head}:0.5)")
            return cls(value)  # hf:NAME:CONFIG[:SPLIT], or a source read_text reports as missing
        share = float(tail)
        if not (math.isfinite(share) and 0 < share <= 1):
            raise DataError(f"--data {value}: share {tail} is not in (0, 1] (the fraction of calibration windows "
                            f"drawn from {head})")
        return cls(head, share)


def _looks_numeric(text: str) -> bool:
    return re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", text.strip(), re.I) is not None


def parse_sources(values: str | list[str]) -> list[Source]:
    """The ``--data`` values as sources with shares summing to 1 (equal shares if none is given)."""
    sources = [Source.parse(v) for v in ([values] if isinstance(values, str) else values)]
    if not sources:
        raise DataError("no calibration data: give --data")
    given = [s.share is not None for s in sources]
    if any(given) and not all(given):
        missing = ", ".join(s.spec for s in sources if s.share is None)
        raise DataError(f"--data: give a share to every source or to none (no share: {missing})")
    if not any(given):
        return [Source(s.spec, 1.0 / len(sources)) for s in sources]
    total = sum(s.share for s in sources)
    if abs(total - 1.0) > 0.01:
        raise DataError(f"--data: the shares sum to {total:g}, not 1")
    return sources


def window_counts(shares: list[float], num_samples: int) -> list[int]:
    """num_samples split by share, largest remainders first (sums to num_samples)."""
    exact = [sh * num_samples for sh in shares]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - exact[i])[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def token_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                  gen: torch.Generator | None = None, bos: int | None = None) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at random offsets (gen, else torch.Generator(seed));
    ``bos``: each window is that token and ``seq_len - 1`` text tokens."""
    width = seq_len - (bos is not None)
    if num_samples <= 0 or width <= 0:
        least = "positive" if bos is None else "positive (seq_len above 1 with BOS)"
        raise DataError(f"num_samples and seq_len must be {least}, got {num_samples} and {seq_len}")
    if ids.numel() < width:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {width}")
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - width + 1, (num_samples,), generator=gen)
    windows = torch.stack([ids[s : s + width] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((num_samples, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def window_bos(tokenizer, bos: bool | None = None) -> int | None:
    """The token calibration windows start with, or None: ``bos`` True / False forces it, None
    (the default) means whether the tokenizer starts every text it encodes with its BOS token."""
    token = getattr(tokenizer, "bos_token_id", None)
    if bos and token is None:
        raise DataError("--bos: this tokenizer has no BOS token")
    if bos is None:
        bos = token is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [token]
    return token if bos else None


def calibration_windows(tokenizer, source: str | list[str], num_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, text_field: str = "text", bos: bool | None = None) -> torch.Tensor:
    """[num_samples, seq_len] int64 token ids (``calibration_mix``)."""
    return calibration_mix(tokenizer, source, num_samples, seq_len, seed, text_field, bos)[0]


def calibration_mix(tokenizer, values: str | list[str], num_samples: int = 128, seq_len: int = 512,
                    seed: int = 0, text_field: str = "text",
                    bos: bool | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The windows of the ``--data`` values (``parse_sources``) and, per source, what was drawn
    from it (name, share, windows, tokens in the source) for the checkpoint's metadata.

    One source: the windows of ``token_windows(ids, num_samples, seq_len, seed)``. Several: each
    source's windows drawn in turn from one torch.Generator(seed), then shuffled by it, so a
    batch mixes the sources; the same values and seed give the same windows. ``bos``: windows
    start with the tokenizer's BOS token (``window_bos``); no other special token is added."""
    sources = parse_sources(values)
    bos_id = window_bos(tokenizer, bos)
    if num_samples <= 0 or seq_len <= 0:
        raise DataError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    counts = window_counts([s.share for s in sources], num_samples)
    for s, n in zip(sources, counts):
        if n == 0:
            raise DataError(f"--data {s.spec}: a share of {s.share:g} of {num_samples} windows is no window "
                            f"(raise the share or --num-samples)")
    ids = [torch.tensor(text_ids(tokenizer, read_text(s.spec, text_field)), dtype=torch.long) for s in sources]
    record = [{"source": s.name, "share": round(s.share, 6), "windows": n, "source_tokens": t.numel()}
              for s, n, t in zip(sources, counts, ids)]
    if len(sources) == 1:
        return token_windows(ids[0], num_samples, seq_len, seed, bos=bos_id), record
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for s, n, t in zip(sources, counts, ids):
        try:
            parts.append(token_windows(t, n, seq_len, seed, gen, bos_id))
        except DataError as e:
            raise DataError(f"{s.spec}: {e}") from None
    windows = torch.cat(parts)
    return windows[torch.randperm(windows.shape[0], generator=gen)], record
