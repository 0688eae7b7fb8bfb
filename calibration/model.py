"""Hugging Face causal LMs: loading, decoder layers, their Linear layers, first-layer inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from calibration import CalibrationError
from vllm_dpq.format import is_ignored

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo", "olmo2")


class UnsupportedModelError(CalibrationError):
    """The model has no decoder-layer stack this tool knows how to walk."""


def check_supported(path: str, trust_remote_code: bool = False):
    """The model's config, if this tool can quantize it (cheap: no weights are read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read a model config from {path}: {e}") from None
    if getattr(config, "quantization_config", None):
        qm = config.quantization_config
        qm = qm.get("quant_method") if isinstance(qm, dict) else getattr(qm, "quant_method", qm)
        raise UnsupportedModelError(f"{path} is already quantized ({qm}): start from the unquantized model")
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    return config


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The model from a Hugging Face folder or hub id, on CPU, eval mode."""
    from transformers import AutoModelForCausalLM

    check_supported(path, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers (model.model.layers for Llama/Qwen/Mistral families)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return mod
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, mod in model.named_modules() if mod is layers)


def quantizable_linears(layer: nn.Module, prefix: str, ignore: list[str]) -> dict[str, nn.Linear]:
    """Full name -> nn.Linear inside one decoder layer, minus ignored ones."""
    return {
        f"{prefix}.{name}": mod
        for name, mod in layer.named_modules()
        if isinstance(mod, nn.Linear) and not is_ignored(f"{prefix}.{name}", ignore)
    }


def move_except_layers(model: nn.Module, device: torch.device) -> None:
    """Move embeddings, final norm, rotary buffers, ... to device; decoder layers stay put."""
    prefix = layers_prefix(model) + "."
    for name, mod in model.named_modules():
        if name.startswith(prefix) or name + "." == prefix:
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[bname] = b.to(device)


def layer_kinds(model: nn.Module) -> list[str]:
    """The kind of each decoder layer. Models mixing attention kinds (``config.layer_types``:
    Gemma2's sliding-window and full attention, Qwen2/3 with use_sliding_window) pass each kind
    its own attention mask; the others pass every layer the same arguments."""
    n = len(decoder_layers(model))
    kinds = getattr(model.config, "layer_types", None)
    return list(kinds[:n]) if kinds else ["decoder"] * n


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Inputs of the decoder layers for every calibration batch."""

    hidden: list[torch.Tensor]  # [B, L, H] per batch: the input of the next layer to run
    kwargs: dict[str, list[dict[str, Any]]]  # layer name -> the other arguments per batch (masks, rotary, ...)


def capture_first_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> LayerInputs:
    """Run the model up to its decoder layers: the hidden states entering layer 0 and the other
    arguments of every layer (recorded at the first layer of each kind, see ``layer_kinds``).
    Only embeddings etc. move to device; no decoder layer runs (each is replaced by a recorder
    passing its hidden states through, until the first layer of the last kind)."""
    layers, prefix, kinds = decoder_layers(model), layers_prefix(model), layer_kinds(model)
    last = max(kinds.index(k) for k in kinds)
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    store = LayerInputs([], {f"{prefix}.{i}": by_kind[k] for i, k in enumerate(kinds)})

    def recorder(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                store.hidden.append(hidden.detach())
            if i == kinds.index(kinds[i]):
                by_kind[kinds[i]].append({k: v for k, v in kwargs.items()
                                          if k not in ("past_key_values", "past_key_value")})
            if i == last:
                raise _Stop
            return hidden
        return forward

    move_except_layers(model, device)
    for i in range(last + 1):
        layers[i].forward = recorder(i)  # the instance attribute shadows the class's forward
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for i in range(last + 1):
            del layers[i].forward
    return store
