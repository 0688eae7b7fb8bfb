"""Resumable calibration: after every decoder layer the pipeline commits its results and the
next layer's inputs to a work folder; `vllm-dpq quantize --resume` continues from the last
committed layer and writes a checkpoint byte-identical to an uninterrupted run.

Work folder (beside the output, removed once the checkpoint is written):
    fingerprint.json        everything that determines the result (refused if it differs)
    layer_0000.safetensors  packed codes, scales and input amax of each Linear of layer 0
                            (the writer reads the checkpoint's quantized tensors from these)
    hidden.safetensors      inputs of the next layer (exact, in the calibration dtype)
    progress.json           {"done": i, "stats": {...}}: written last, the commit point
                            (stats: CalibrationResult.stats(), per-layer errors, expert tokens)
Every file is written to a temporary name and renamed, so a kill at any instant leaves the
previous commit intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calibration import CalibrationError
from calibration.pipeline import QuantizedLayer
from vllm_dpq.format import GROUP_SCALE, PACKED, WEIGHT_SCALE, layer_tensors
from vllm_dpq.numerics import QuantizedWeight
from vllm_dpq.packing import unpack_int4
from vllm_dpq.shards import TensorFiles


class ResumeError(CalibrationError):
    pass


def work_dir_for(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.parent / f".{out.name}.dpq-work"


def samples_digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class CalibrationState:
    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.folder, self.fingerprint = Path(folder), json.loads(json.dumps(fingerprint, sort_keys=True))

    # ---------------------------------------------------------------- writing
    def start(self) -> None:
        """Begin a fresh run (discarding any previous state)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        _write_json(self.folder / "fingerprint.json", self.fingerprint)

    def commit(self, index: int, layers: dict[str, Any], stats: dict[str, Any], hidden: list[torch.Tensor]) -> None:
        """Layer `index` is done: its quantized Linears, and the inputs of layer index + 1."""
        tensors = {}
        for name, ql in layers.items():
            tensors.update(layer_tensors(name, ql.qw, None))
            tensors[f"{name}.input_amax"] = torch.tensor([ql.input_amax], dtype=torch.float64)
            tensors[f"{name}.shape"] = torch.tensor([*ql.qw.shape, ql.qw.group_size])
        _write_tensors(self.folder / f"layer_{index:04d}.safetensors", tensors)
        _write_tensors(self.folder / "hidden.safetensors", {f"{b}": h.cpu() for b, h in enumerate(hidden)})
        _write_json(self.folder / "progress.json", {"done": index, "stats": stats})

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def load(self) -> tuple[int, dict[str, Any], list[torch.Tensor]] | None:
        """(last done layer, stats, next inputs), or None if nothing committed."""
        fp = self.folder / "fingerprint.json"
        if not fp.exists():
            return None
        if json.loads(fp.read_text()) != self.fingerprint:
            raise ResumeError(f"{self.folder} was made with other settings, model or data: cannot resume "
                              "(run without --resume to start over)")
        progress = self.folder / "progress.json"
        if not progress.exists():
            return None
        p = json.loads(progress.read_text())
        h = load_file(str(self.folder / "hidden.safetensors"))
        return p["done"], p["stats"], [h[f"{b}"] for b in range(len(h))]

    def layers(self) -> "CommittedLayers":
        """Every committed layer's results, read from the work folder on access."""
        done = json.loads((self.folder / "progress.json").read_text())["done"]
        return CommittedLayers(TensorFiles(self.folder, [self.folder / f"layer_{i:04d}.safetensors"
                                                         for i in range(done + 1)]))


class CommittedLayers(Mapping):
    """Linear name -> QuantizedLayer, one layer read at a time from the work folder."""

    def __init__(self, files: TensorFiles):
        self.files = files
        self.names = sorted(n[: -len(PACKED) - 1] for n in files if n.endswith("." + PACKED))
        self._known = set(self.names)

    def __contains__(self, name) -> bool:  # Mapping's default would read the layer to find out
        return name in self._known

    def __getitem__(self, name: str):
        if name not in self._known:
            raise KeyError(name)
        t = {s: self.files[f"{name}.{s}"] for s in (PACKED, GROUP_SCALE, WEIGHT_SCALE, "input_amax", "shape")}
        n, k, g = t["shape"].tolist()
        qw = QuantizedWeight(unpack_int4(t[PACKED], k), t[GROUP_SCALE], t[WEIGHT_SCALE], g)
        return QuantizedLayer(qw, float(t["input_amax"].item()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
