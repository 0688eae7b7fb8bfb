"""compressed-tensors W4A8-FP8 checkpoint -> DPQ checkpoint with stock vLLM's numerics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_dpq.format import layer_tensors, read_checkpoint, write_folder_atomically, write_manifest
from vllm_dpq.interop.ct_format import copy_side_files, dpq_config_from_compressed_tensors, read_compressed_tensors
from vllm_dpq.interop.fold import ct_scales_to_dpq
from vllm_dpq.numerics import FP8_DTYPE, QuantizedWeight, expand_groups
from vllm_dpq.packing import unpack_int4


def import_compressed_tensors(ct_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                              overwrite: bool = False) -> Path:
    """compressed-tensors W4A8-FP8 checkpoint -> DPQ checkpoint with the same numerics as stock
    vLLM's H100 path (s_w = chan, s_g = s8: ``ct_scales_to_dpq``). For the reference forward,
    evaluation and ``vllm-dpq inspect``; serving does the same conversion at load time.

    A group whose folded s8 underflows to 0 is served as zeros by vLLM; DPQ scales must be
    positive, so it gets the smallest FP8 scale and all-zero codes (same weights)."""
    src = Path(ct_dir)
    hf, scheme, layers, rest = read_compressed_tensors(src)
    cfg = hf.get("quantization_config") or hf.get("compression_config")
    dpq = dpq_config_from_compressed_tensors(cfg)
    tensors = dict(rest)
    for p, lay in layers.items():
        s8, chan = ct_scales_to_dpq(lay.scales, scheme.group_size == -1)
        q = unpack_int4(lay.packed, lay.k)
        zero = s8.float() == 0
        if zero.any():
            g = scheme.group(lay.k)
            q = torch.where(expand_groups(zero.float(), lay.k, g) > 0, torch.zeros_like(q), q)
            s8 = torch.where(zero, torch.tensor(2.0**-9), s8.float()).to(FP8_DTYPE)
        tensors.update(layer_tensors(p, QuantizedWeight(q, s8, chan, scheme.group(lay.k)), None))

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        out_hf = dict(hf)
        out_hf.pop("compression_config", None)
        out_hf["quantization_config"] = dpq.to_dict()
        (tmp / "config.json").write_text(json.dumps(out_hf, indent=2, sort_keys=True) + "\n")
        copy_side_files(src, tmp)
        write_manifest(tmp, {p: (lay.n, lay.k) for p, lay in layers.items()})

    out = write_folder_atomically(Path(out_dir), overwrite, write)
    read_checkpoint(out)  # validate what was written
    return out
