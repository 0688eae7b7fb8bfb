"""Write a DPQ checkpoint (docs/FORMAT.md), atomically: everything goes to a temporary
folder beside the target, renamed into place only when complete. Tensors are streamed into
safetensors shards one at a time: unquantized ones from the source checkpoint (or from the
model, when it is in memory), quantized ones from the calibration result."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from calibration.pipeline import CalibrationResult
from vllm_dpq import __version__
from vllm_dpq.format import DPQConfig, expected_tensors, layer_tensors, write_folder_atomically, write_manifest
from vllm_dpq.moe import router_names
from vllm_dpq.shards import DEFAULT_SHARD_BYTES, Entry, write_shards


def checkpoint_entries(model: nn.Module, result: CalibrationResult, config: DPQConfig, dtype: torch.dtype,
                       source: Mapping[str, torch.Tensor] | None = None) -> list[Entry]:
    """Every tensor of the checkpoint, announced (name, dtype, shape) and loaded on demand.
    The model's state dict names the unquantized tensors (its values may be on the meta
    device: source then holds them); floating ones are saved in dtype."""
    state = model.state_dict()
    source = state if source is None else source
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    entries = []
    for name, t in state.items():
        if (name.rsplit(".", 1)[0] in result.layers and name.endswith(".weight")) or (tied and name == "lm_head.weight"):
            continue
        out = dtype if t.is_floating_point() else t.dtype
        entries.append(Entry(name, out, tuple(t.shape), functools.partial(_converted, source, name, out)))

    @functools.lru_cache(maxsize=1)  # the entries of one layer are written one after another
    def quantized(prefix: str) -> dict[str, torch.Tensor]:
        layer = result.layers[prefix]
        s_x = torch.tensor([max(layer.input_amax, 1e-12) / fp8_max]) if static else None
        return layer_tensors(prefix, layer.qw, s_x)

    static = config.scheme.activation_scheme == "static"
    fp8_max = config.scheme.fp8_max
    for prefix in result.layers:
        n, k = model.get_submodule(prefix).weight.shape
        for name, (shape, dtypes) in expected_tensors(prefix, n, k, config.scheme).items():
            entries.append(Entry(name, dtypes[0], shape, lambda p=prefix, name=name: quantized(p)[name]))
    return entries


def _converted(source: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    return source[name].to(dtype)


def unquantized_linears(model: nn.Module, result: CalibrationResult) -> list[str]:
    """The concrete name of every Linear calibration left unquantized (lm_head, ignored ones,
    MoE routers, which vLLM builds as linear layers): the checkpoint's ``ignore`` list, so the
    server skips exactly these."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} | set(router_names(model))
    return sorted(linears - set(result.layers))


def save_checkpoint(out: str | os.PathLike, model: nn.Module, tokenizer, result: CalibrationResult,
                    config: DPQConfig, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                    source: Mapping[str, torch.Tensor] | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> Path:
    """source: the unquantized tensors by name (a streamed model's TensorFiles); default: the
    model's own state dict. config.ignore is replaced by the concrete unquantized Linears."""
    config = replace(config, ignore=unquantized_linears(model, result),
                     producer=config.producer or {"name": "vllm-dpq", "version": __version__})

    def write(tmp: Path) -> None:
        from tqdm.auto import tqdm

        entries = checkpoint_entries(model, result, config, dtype, source)
        with tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc="writing",
                  disable=not progress) as bar:
            write_shards(tmp, entries, max_shard_bytes, lambda e: bar.update(e.nbytes))
        hf = model.config.to_dict()
        hf["quantization_config"] = config.to_dict()
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        hf["dtype"] = hf["torch_dtype"]
        if "rope_theta" not in hf:  # older readers want it at the top level
            theta = (hf.get("rope_parameters") or {}).get("rope_theta")
            if theta is not None:
                hf["rope_theta"] = theta
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in result.layers}
        write_manifest(tmp, shapes, config.scheme)

    return write_folder_atomically(Path(out), overwrite, write)
