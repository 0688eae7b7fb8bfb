"""The compressed-tensors W4A8-FP8 format (llm-compressor's ``W4AFP8`` preset saved
``pack-quantized``): its config, parsed and written, and reading such a checkpoint folder.

    P.weight_packed  int32 [N, ceil(K/8)]   INT4 codes q, nibble q + 8 (our layout, packing.py)
    P.weight_scale   bf16  [N, ceil(K/G)]   group scale S in the weight's own units: W ~ q * S
    P.weight_shape   int64 [2]              [N, K]
(symmetric: no zero point; no g_idx), config ``weights``: int 4 bit symmetric group 128,
``input_activations``: float 8 bit dynamic per token.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vllm_dpq.format import MANIFEST, DPQConfig, load_safetensors
from vllm_dpq.interop.fold import CUTLASS_GROUP, folded_scheme
from vllm_dpq.numerics import Scheme
from vllm_dpq.packing import packed_cols

CT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
CT_PACKED, CT_SCALE, CT_SHAPE = "weight_packed", "weight_scale", "weight_shape"
EXPORT_REPORT = "dpq_export.json"


class InteropError(ValueError):
    """A checkpoint cannot be converted or served as asked; the message says why."""


def is_compressed_tensors_config(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and cfg.get("quant_method") == CT_METHOD


def _arg_problems(w, a, fmt) -> list[str]:
    p = []
    if w is None:
        return ["no weight quantization"]
    if w.type != "int" or w.num_bits != 4:
        p.append(f"weights are {w.type}{w.num_bits}, need int4")
    if not w.symmetric:
        p.append("asymmetric weights (zero points) are not supported")
    if w.dynamic:
        p.append("dynamic weight quantization")
    if w.strategy not in ("group", "channel"):
        p.append(f"weight strategy {w.strategy!r}, need 'group' or 'channel'")
    if w.actorder in ("group", "dynamic"):
        p.append(f"actorder {w.actorder!r} (g_idx) is not supported")
    if a is None:
        p.append("no input_activations (W4A16): serve it with stock vLLM")
    else:
        if a.type != "float" or a.num_bits != 8:
            p.append(f"input activations are {a.type}{a.num_bits}, need float8")
        if not a.dynamic or a.strategy != "token":
            p.append(f"input activations {'dynamic' if a.dynamic else 'static'} {a.strategy}, need dynamic token")
        if not a.symmetric:
            p.append("asymmetric input activations")
    if fmt != CT_FORMAT:
        p.append(f"format {fmt!r}, need {CT_FORMAT!r}")
    return p


def w4a8_fp8_args(cfg: Mapping[str, Any]):
    """(weights, input_activations) QuantizationArgs shared by every config group of a
    compressed-tensors W4A8-FP8 config; InteropError naming the first unsupported thing."""
    from compressed_tensors.quantization import QuantizationArgs

    if not is_compressed_tensors_config(cfg):
        raise InteropError(f"quant_method is {cfg.get('quant_method') if isinstance(cfg, Mapping) else None!r}, "
                           f"not {CT_METHOD!r}")
    for key in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if cfg.get(key):
            raise InteropError(f"compressed-tensors {key} is not supported by --quantization dpq")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise InteropError("compressed-tensors config has no config_groups")
    found, key0 = None, None
    for name, grp in groups.items():
        try:
            w = QuantizationArgs.model_validate(grp["weights"]) if grp.get("weights") else None
            a = QuantizationArgs.model_validate(grp["input_activations"]) if grp.get("input_activations") else None
        except Exception as e:  # pydantic ValidationError
            raise InteropError(f"compressed-tensors config group {name!r}: {e}") from None
        problems = _arg_problems(w, a, grp.get("format") or cfg.get("format"))
        if grp.get("output_activations"):
            problems.append("output activation quantization")
        if problems:
            raise InteropError(f"compressed-tensors config group {name!r} (targets {grp.get('targets')}) is not "
                               f"W4A8-FP8 as --quantization dpq serves it: " + "; ".join(problems))
        key = (w.strategy, w.group_size)
        if found is None:
            found, key0 = (w, a), key
        elif key != key0:
            raise InteropError(f"config groups use different weight layouts {key0} and {key}: "
                               "one group size per checkpoint is supported")
    return found


def scheme_from_compressed_tensors(cfg: Mapping[str, Any]) -> Scheme:
    w, _ = w4a8_fp8_args(cfg)
    g = -1 if w.strategy == "channel" else int(w.group_size)
    return folded_scheme(g)


def dpq_config_from_compressed_tensors(cfg: Mapping[str, Any]) -> DPQConfig:
    """The DPQConfig that serves a compressed-tensors W4A8-FP8 checkpoint (layer selection
    stays compressed-tensors' own: targets and ignore, matched by vLLM)."""
    return DPQConfig(
        scheme=scheme_from_compressed_tensors(cfg),
        ignore=list(cfg.get("ignore") or []),
        algorithm={"source": CT_METHOD, "scales": "vllm-fold"},
        producer={"name": CT_METHOD, "version": str(cfg.get("version", ""))},
    )


def compressed_tensors_config(ignore: list[str], group_size: int = CUTLASS_GROUP, preset: str = "W4AFP8"
                              ) -> dict[str, Any]:
    """config.json ``quantization_config`` exactly as llm-compressor writes the W4AFP8 (or W4A16)
    preset saved pack-quantized (built and serialised by compressed-tensors itself)."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME, TRANSFORM_CONFIG_NAME,
    )
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size == -1:
        scheme.weights.strategy, scheme.weights.group_size = "channel", None
    else:
        scheme.weights.group_size = group_size
    scheme.weights.observer = "memoryless_minmax"  # what the preset resolves to when applied
    scheme.format = CT_FORMAT
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format=CT_FORMAT,
                            quantization_status=QuantizationStatus.COMPRESSED)
    return {  # as ModelCompressor.update_config writes it
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: CT_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **qc.model_dump(exclude=["quant_method"]),
    }


@dataclass
class CTLayer:
    n: int
    k: int
    packed: torch.Tensor
    scales: torch.Tensor


def read_compressed_tensors(path: str | os.PathLike) -> tuple[dict, Scheme, dict[str, CTLayer],
                                                              dict[str, torch.Tensor]]:
    """(hf_config, scheme, quantized layers, other tensors) of a compressed-tensors W4A8-FP8
    folder; InteropError naming the problem."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{path / 'config.json'}: {e}") from None
    cfg = hf.get("quantization_config") or hf.get("compression_config")
    scheme = scheme_from_compressed_tensors(cfg or {})
    tensors = load_safetensors(path)
    layers = {}
    prefixes = {n[: -len(CT_PACKED) - 1] for n in tensors if n.endswith("." + CT_PACKED)}
    if not prefixes:
        raise InteropError(f"{path}: no *.{CT_PACKED} tensors")
    for p in sorted(prefixes):
        packed, scales, shape = (tensors.get(f"{p}.{s}") for s in (CT_PACKED, CT_SCALE, CT_SHAPE))
        if scales is None or shape is None:
            raise InteropError(f"layer {p}: missing {p}.{CT_SCALE if scales is None else CT_SHAPE}")
        n, k = (int(x) for x in shape.tolist())
        g = scheme.group(k)
        want = {CT_PACKED: ((n, packed_cols(k)), torch.int32), CT_SCALE: ((n, -(-k // g)), None)}
        for s, t in ((CT_PACKED, packed), (CT_SCALE, scales)):
            shp, dt = want[s]
            if tuple(t.shape) != shp or (dt is not None and t.dtype != dt):
                raise InteropError(f"tensor {p}.{s}: {t.dtype} {list(t.shape)}, expected {list(shp)} "
                                   f"for [N, K] = [{n}, {k}]")
        if f"{p}.weight_zero_point" in tensors or f"{p}.weight_g_idx" in tensors:
            raise InteropError(f"layer {p}: zero points / g_idx are not supported")
        layers[p] = CTLayer(n, k, packed, scales)
    quant = {f"{p}.{s}" for p in layers for s in (CT_PACKED, CT_SCALE, CT_SHAPE)}
    rest = {k: v for k, v in tensors.items() if k not in quant}
    return hf, scheme, layers, rest


def copy_side_files(src: Path, dst: Path) -> None:
    skip = {"config.json", MANIFEST, "model.safetensors.index.json", EXPORT_REPORT}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
