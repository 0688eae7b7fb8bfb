"""Safetensors folders, one tensor at a time: a lazy reader over a (sharded) folder and a
streaming shard writer, so that a checkpoint of any size is read, checked and written in
memory bounded by its largest tensor.

Reading does not memory-map: a mapped file's pages count as the reader's resident memory
until it is closed, so reading every tensor of a 140 GB folder through open mappings looks
like (and, under memory pressure, behaves like) holding all of it. Each tensor is read with
one ``readinto`` into its own buffer instead. Sharded folders follow Hugging Face's layout:
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``; one shard is
``model.safetensors`` and no index.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's customary 5GB
MAX_HEADER = 100 * 2**20

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorFileError(ValueError):
    """A safetensors file or index is malformed; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor name -> where its data is, with the checks the safetensors library makes:
    known dtypes, sizes that match the shapes, data regions inside the file that neither
    overlap nor leave gaps."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise TensorFileError(f"{file.name}: cannot read safetensors file (bad header length; truncated?)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{file.name}: cannot read safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{file.name}: cannot read safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    out, regions = {}, []
    for name, e in header.items():
        try:
            dtype, shape, (s, t) = DTYPES[e["dtype"]], tuple(int(x) for x in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{file.name}: tensor {name}: unknown dtype or malformed entry {e!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or t - s != numel * dtype.itemsize:
            raise TensorFileError(f"{file.name}: tensor {name}: {t - s} bytes for shape {list(shape)} {e['dtype']}")
        out[name] = TensorInfo(file, dtype, shape, 8 + n + s, t - s)
        regions.append((s, t, name))
    end = 0
    for s, t, name in sorted(regions):
        if s != end:
            raise TensorFileError(f"{file.name}: tensor {name}: data regions overlap or leave a gap")
        end = t
    if 8 + n + end != size:
        raise TensorFileError(f"{file.name}: cannot read safetensors file (size {size}, header says {8 + n + end}; "
                              "truncated?)")
    return out


class TensorFiles(Mapping[str, torch.Tensor]):
    """The tensors of a folder's ``*.safetensors`` files (or of the given files), read one at a
    time on access. With ``model.safetensors.index.json``, the index must list exactly the
    tensors each file holds."""

    def __init__(self, folder: str | os.PathLike, files: Iterable[Path] | None = None):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors")) if files is None else list(files)
        if not files:
            raise TensorFileError(f"{self.folder}: no *.safetensors files")
        self.info: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.info:
                    raise TensorFileError(f"{f.name}: tensor {name} also stored in {self.info[name].file.name}")
                self.info[name] = info
        index = self.folder / INDEX
        if index.exists():
            self._check_index(index)

    def _check_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise TensorFileError(f"{INDEX}: not a safetensors index (no 'weight_map' object)") from None
        for name, info in self.info.items():
            if weight_map.get(name) != info.file.name:
                raise TensorFileError(f"{INDEX}: tensor {name} is in {info.file.name}, the index says "
                                      f"{weight_map.get(name)}")
        extra = sorted(weight_map.keys() - self.info.keys())
        if extra:
            raise TensorFileError(f"{INDEX}: lists tensor {extra[0]}, which no file holds")

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.info[name]
        t = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            with info.file.open("rb") as f:
                f.seek(info.start)
                if f.readinto(_bytes(t)) != info.nbytes:
                    raise TensorFileError(f"{info.file.name}: tensor {name}: file ends inside the tensor's data")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_heap(threshold: int = 1 << 20) -> None:
    """For a long run that allocates and drops layer-sized tensors (calibration): every
    allocation of threshold bytes or more gets its own mapping, returned to the OS when freed.
    glibc's default raises that threshold as large blocks are freed and then serves them from
    its heap, whose holes made peak RSS creep up layer after layer (+30% over 4 layers of
    hidden 1024 here; flat with this)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def trim_heap() -> None:
    """Give freed heap memory (the small blocks bound_heap leaves to the heap) back to the OS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype), writable in place."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype and shape up front, its data when asked."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def entries_of(tensors: Mapping[str, torch.Tensor]) -> list[Entry]:
    """Entries for tensors already in memory."""
    return [Entry(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()]


def shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                     for i in range(1, count + 1)]


def write_shards(folder: Path, entries: list[Entry], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Callable[[Entry], None] | None = None) -> list[Path]:
    """Write entries (sorted by name, then packed into shards of at most max_shard_bytes; a
    larger tensor gets a shard of its own) and, for more than one shard, the index. One
    tensor is in memory at a time. Deterministic: the same entries give the same bytes."""
    if max_shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {max_shard_bytes}")
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in sorted(entries, key=lambda e: e.name):
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    paths = [folder / name for name in shard_names(len(shards))]
    for path, shard in zip(paths, shards):
        _write_file(path, shard, progress)
        trim_heap()
    if len(paths) > 1:
        total = sum(e.nbytes for e in entries)
        weight_map = {e.name: p.name for p, shard in zip(paths, shards) for e in shard}
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2, sort_keys=True) + "\n")
    return paths


def _write_file(path: Path, entries: list[Entry], progress) -> None:
    # data ordered by element size (then name) so every tensor is aligned, as safetensors does
    entries = sorted(entries, key=lambda e: (-e.dtype.itemsize, e.name))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in entries:
        header[e.name] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for e in entries:
            t = e.load()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise ValueError(f"tensor {e.name}: produced {t.dtype} {list(t.shape)}, announced {e.dtype} "
                                 f"{list(e.shape)}")
            f.write(_bytes(t.detach().cpu().contiguous()))
            if progress is not None:
                progress(e)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (Hugging Face's max_shard_size spelling)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    unit = (m.group(2) or "").upper()
    scale = (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1) if unit else 1
    return int(float(m.group(1)) * scale)
