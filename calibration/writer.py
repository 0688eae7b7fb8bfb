"""Write a DPQ checkpoint (docs/FORMAT.md), atomically: everything goes to a temporary
folder beside the target, renamed into place only when complete."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from calibration.pipeline import CalibrationResult
from vllm_dpq import __version__
from vllm_dpq.format import DPQConfig, layer_tensors, write_folder_atomically, write_manifest


def checkpoint_tensors(model: nn.Module, result: CalibrationResult, config: DPQConfig,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unquantized tensors of the model (in dtype) plus the quantized tensors of each layer."""
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.rsplit(".", 1)[0] in result.layers and name.endswith(".weight"):
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
    static = config.scheme.activation_scheme == "static"
    fp8_max = config.scheme.fp8_max
    for name, layer in result.layers.items():
        s_x = torch.tensor([max(layer.input_amax, 1e-12) / fp8_max]) if static else None
        tensors.update(layer_tensors(name, layer.qw, s_x))
    return dict(sorted(tensors.items()))


def save_checkpoint(out: str | os.PathLike, model: nn.Module, tokenizer, result: CalibrationResult,
                    config: DPQConfig, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Path:
    config.producer = config.producer or {"name": "vllm-dpq", "version": __version__}

    def write(tmp: Path) -> None:
        tensors = checkpoint_tensors(model, result, config, dtype)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
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
        write_manifest(tmp, {name: tuple(layer.qw.shape) for name, layer in result.layers.items()}, config.scheme)

    return write_folder_atomically(Path(out), overwrite, write)
