"""Hugging Face causal LMs: loading, decoder layers, their Linear layers, first-layer inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration import CalibrationError
from vllm_dpq.format import is_ignored
from vllm_dpq.moe import MOE_FAMILIES, router_names
from vllm_dpq.shards import TensorFileError, TensorFiles

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo",
               "olmo2")
SUPPORTED_TYPES = (*DENSE_TYPES, *MOE_FAMILIES)


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


def load_model(path: str, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> tuple[nn.Module, "StreamedWeights"]:
    """The model's skeleton, eval mode, and its checkpoint's tensors (read lazily).

    No decoder layer is read here: their parameters stay on the meta device until the
    pipeline calibrates each (``StreamedWeights``). Everything the forward pass runs before
    the first layer (embeddings, ...) is read now, in dtype; the output embedding never is
    (calibration does not run it; the writer copies it from the source). Host memory is then
    bounded by the embeddings plus one decoder layer, whatever the depth."""
    from transformers import AutoModelForCausalLM

    config = check_supported(path, trust_remote_code)
    folder = local_folder(path)
    try:
        files = TensorFiles(folder)
    except TensorFileError as e:
        raise CalibrationError(f"{e} (the model must be stored as safetensors; pickled .bin weights are never "
                               "read)") from None
    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    weights = StreamedWeights(files)
    layers = layers_prefix(model) + "."
    out = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if not (name + ".").startswith(layers) and mod is not out:
            weights.load(mod, f"{name}." if name else "", "cpu", recurse=False)
    return model, weights


def local_folder(path: str) -> Path:
    """path itself if it is a folder, else a hub id's snapshot (safetensors, configs, tokenizer)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown id, ...: the hub library's many error types
        raise CalibrationError(f"{path}: not a folder, and the hub download failed ({e})") from None


@contextlib.contextmanager
def meta_parameters():
    """Modules built inside get their parameters on the meta device (no memory, no init);
    buffers (rotary tables, embedding scales) are computed as usual."""
    register = nn.Module.register_parameter

    def to_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class ResidentWeights:
    """A model already in memory: a layer moves to the compute device and back."""

    def load(self, module: nn.Module, prefix: str, device, recurse: bool = True) -> None:
        module.to(device)

    def release(self, module: nn.Module) -> None:
        module.to("cpu")


class StreamedWeights:
    """Parameters read from the source checkpoint when a module is needed (straight to the
    compute device, in the skeleton's dtype), and dropped back to the meta device after; the
    buffers the checkpoint stores are read too (the skeleton computed the others)."""

    def __init__(self, files: TensorFiles):
        self.files = files

    def load(self, module: nn.Module, prefix: str, device, recurse: bool = True) -> None:
        for name, p in list(module.named_parameters(recurse=recurse)):
            full = prefix + name
            if full not in self.files:
                raise CalibrationError(f"{self.files.folder}: no tensor {full} in the checkpoint for the model's "
                                       f"parameter of that name (a checkpoint saved with other names?)")
            t = self.files[full]
            if tuple(t.shape) != tuple(p.shape):
                raise CalibrationError(f"tensor {full}: shape {list(t.shape)} in the checkpoint, the model's config "
                                       f"expects {list(p.shape)}")
            _set_parameter(module, name, t.to(device=device, dtype=p.dtype))
        for name, b in list(module.named_buffers(recurse=recurse)):  # stored buffers (a router's bias, ...)
            if prefix + name in self.files:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._buffers[leaf] = self.files[prefix + name].to(device=device, dtype=b.dtype)

    def release(self, module: nn.Module) -> None:
        for name, p in list(module.named_parameters()):
            _set_parameter(module, name, torch.empty_like(p, device="meta"))


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


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
    """Full name -> nn.Linear inside one decoder layer, minus ignored ones and MoE routers."""
    routers = set(router_names(layer))
    return {
        f"{prefix}.{name}": mod
        for name, mod in layer.named_modules()
        if isinstance(mod, nn.Linear) and name not in routers and not is_ignored(f"{prefix}.{name}", ignore)
    }


def move_except_layers(model: nn.Module, device: torch.device) -> None:
    """Move embeddings, final norm, rotary buffers, ... to device; decoder layers stay put."""
    prefix = layers_prefix(model) + "."
    for name, mod in model.named_modules():
        if name.startswith(prefix) or name + "." == prefix:
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta":  # the output embedding of a streamed model
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[bname] = b.to(device)


def layer_kinds(model: nn.Module) -> list[str]:
    """The kind of each decoder layer. Models mixing attention kinds (``config.layer_types``:
    Gemma2's sliding-window and full attention, Gemma 3's too with a rotary table per kind,
    Qwen2/3 with use_sliding_window) pass each kind its own attention mask and position
    embeddings; the others pass every layer the same arguments."""
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
    # asymmetric calibration: the same batches through the full-precision layers (None: not kept)
    fp_hidden: list[torch.Tensor] | None = None


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
