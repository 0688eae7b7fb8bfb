"""Resumable calibration: after every decoder layer the pipeline commits its results and the
next layer's inputs to a work folder; `vllm-dpq quantize --resume` continues from the last
committed layer and writes a checkpoint byte-identical to an uninterrupted run.

Work folder (beside the output, removed once the checkpoint is written):
    fingerprint.json        everything that determines the result (refused if it differs)
    layer_0000.safetensors  codes, scales and input amax of each Linear of layer 0
    hidden.safetensors      inputs of the next layer (exact, in the calibration dtype)
    progress.json           {"done": i, "errors": [...]}: written last, the commit point
Every file is written to a temporary name and renamed, so a kill at any instant leaves the
previous commit intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calibration import CalibrationError
from vllm_dpq.numerics import QuantizedWeight


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

    def commit(self, index: int, layers: dict[str, Any], errors: list[float], hidden: list[torch.Tensor]) -> None:
        """Layer `index` is done: its quantized Linears, and the inputs of layer index + 1."""
        tensors = {}
        for name, ql in layers.items():
            tensors[f"{name}.q"] = ql.qw.q
            tensors[f"{name}.group_scale"] = ql.qw.group_scale
            tensors[f"{name}.weight_scale"] = ql.qw.weight_scale
            tensors[f"{name}.input_amax"] = torch.tensor([ql.input_amax], dtype=torch.float64)
            tensors[f"{name}.group_size"] = torch.tensor([ql.qw.group_size])
        _write_tensors(self.folder / f"layer_{index:04d}.safetensors", tensors)
        _write_tensors(self.folder / "hidden.safetensors", {f"{b}": h.cpu() for b, h in enumerate(hidden)})
        _write_json(self.folder / "progress.json", {"done": index, "errors": errors})

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def load(self) -> tuple[int, dict[str, tuple[QuantizedWeight, float]], list[float], list[torch.Tensor]] | None:
        """(last done layer, quantized layers, errors, next inputs), or None if nothing committed."""
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
        layers = {}
        for i in range(p["done"] + 1):
            t = load_file(str(self.folder / f"layer_{i:04d}.safetensors"))
            for key in t:
                if key.endswith(".q"):
                    name = key[:-2]
                    qw = QuantizedWeight(t[key], t[f"{name}.group_scale"], t[f"{name}.weight_scale"],
                                         int(t[f"{name}.group_size"].item()))
                    layers[name] = (qw, float(t[f"{name}.input_amax"].item()))
        h = load_file(str(self.folder / "hidden.safetensors"))
        hidden = [h[f"{b}"] for b in range(len(h))]
        return p["done"], layers, p["errors"], hidden
