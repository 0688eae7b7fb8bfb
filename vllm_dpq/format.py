"""The DPQ checkpoint format: the contract between calibration and serving (docs/FORMAT.md).

A DPQ checkpoint is a Hugging Face model folder:
- config.json with ``quantization_config`` (see ``DPQConfig``), ``quant_method == "dpq"``;
- ``dpq_manifest.json``: format version and every quantized layer with its [N, K];
- ``*.safetensors`` (one ``model.safetensors``, or shards with ``model.safetensors.index.json``):
  unquantized tensors as usual, and for each quantized layer ``P``:
    P.weight_packed       int32   [N, ceil(K/8)]   INT4 codes, compressed-tensors layout
    P.weight_group_scale  bf16 or float8_e4m3fn  [N, ceil(K/G)]   s_g (> 0, finite)
    P.weight_scale        fp32    [1] or [N]        s_w (> 0, finite)
    P.input_scale         fp32    [1]               s_x, static activation scheme only
    P.bias                (unchanged, if the layer has one)
Only safetensors are read: nothing in a checkpoint is ever executed.

Length: this module is docs/FORMAT.md in code (config, tensor contract, validation on read,
manifest and atomic writes); one contract, one file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from vllm_dpq.moe import unfuse_experts
from vllm_dpq.numerics import SCALE_DTYPES, QuantizedWeight, Scheme
from vllm_dpq.packing import packed_cols, unpack_int4
from vllm_dpq.shards import TensorFileError, TensorFiles

QUANT_METHOD = "dpq"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "dpq_manifest.json"

PACKED, GROUP_SCALE, WEIGHT_SCALE, INPUT_SCALE = "weight_packed", "weight_group_scale", "weight_scale", "input_scale"
QUANT_SUFFIXES = (PACKED, GROUP_SCALE, WEIGHT_SCALE, INPUT_SCALE)


class CheckpointError(ValueError):
    """A DPQ checkpoint is malformed. The message names the file, layer and tensor."""


@dataclass
class DPQConfig:
    """``quantization_config`` of a DPQ checkpoint."""

    scheme: Scheme
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    algorithm: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    producer: dict[str, str] = field(default_factory=dict)  # {"name": ..., "version": ...}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight_bits": 4,
            **self.scheme.to_dict(),
            "ignore": list(self.ignore),
            "algorithm": dict(self.algorithm),
            "calibration": dict(self.calibration),
            # a JSON object, never a string: vLLM reads producer.get("name") to spot other formats
            "producer": dict(self.producer),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DPQConfig":
        if not isinstance(d, Mapping):
            raise CheckpointError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"quant_method is {d.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"unsupported DPQ format_version {version!r}; this vllm-dpq reads {list(SUPPORTED_VERSIONS)}"
                " (upgrade vllm-dpq for newer checkpoints)"
            )
        if d.get("weight_bits", 4) != 4:
            raise CheckpointError(f"weight_bits must be 4, got {d.get('weight_bits')!r}")
        try:
            scheme = Scheme(
                group_size=int(d["group_size"]),
                fp8_max=float(d.get("fp8_max", 448.0)),
                weight_scale=d.get("weight_scale", "tensor"),
                group_scale_dtype=d.get("group_scale_dtype", "bfloat16"),
                activation_scheme=d.get("activation_scheme", "dynamic"),
            )
        except KeyError as e:
            raise CheckpointError(f"quantization_config lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config: {e}") from None
        ignore = d.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise CheckpointError("quantization_config.ignore must be a list of strings")
        return cls(
            scheme=scheme,
            ignore=ignore,
            algorithm=dict(d.get("algorithm", {})),
            calibration=dict(d.get("calibration", {})),
            format_version=version,
            producer=d["producer"] if isinstance(d.get("producer"), dict) else {},
        )


def is_ignored(name: str, patterns: list[str]) -> bool:
    """Does the config's ``ignore`` list name this layer? compressed-tensors style entries: an
    exact name, a name suffix after a dot (``down_proj``), a glob, or ``re:REGEX`` (matched from
    the start). Calibration skips, and the plugin serves unquantized, exactly these layers."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p):
            return True
    return False


def expected_tensors(prefix: str, n: int, k: int, scheme: Scheme) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    """Name -> (shape, allowed dtypes) of the quantized tensors of one layer."""
    out = {
        f"{prefix}.{PACKED}": ((n, packed_cols(k)), (torch.int32,)),
        f"{prefix}.{GROUP_SCALE}": ((n, scheme.num_groups(k)), (scheme.scale_dtype,)),
        f"{prefix}.{WEIGHT_SCALE}": (((n,) if scheme.weight_scale == "channel" else (1,)), (torch.float32,)),
    }
    if scheme.activation_scheme == "static":
        out[f"{prefix}.{INPUT_SCALE}"] = ((1,), (torch.float32,))
    return out


def check_scale(name: str, t: torch.Tensor, scheme: Scheme | None = None) -> None:
    """Scales must be finite and strictly positive. With the scheme, a DPQ checkpoint's scales
    must also keep their invariants: 8 * s_g <= fp8_max, and a per-tensor s_w is a power of two
    (per-channel s_w may be any positive fp32, DPQ spec section 1)."""
    v = t.float()
    if not torch.isfinite(v).all():
        raise CheckpointError(f"tensor {name}: scale is not finite (NaN or Inf)")
    if not (v > 0).all():
        raise CheckpointError(f"tensor {name}: scale is not positive (min {v.min().item():g})")
    if scheme is None:
        return
    if name.endswith(GROUP_SCALE) and (8 * v > scheme.fp8_max).any():
        raise CheckpointError(f"tensor {name}: 8 * scale exceeds fp8_max {scheme.fp8_max:g} (max {v.max().item():g})")
    if (name.endswith(WEIGHT_SCALE) and scheme.weight_scale == "tensor"
            and not torch.equal(torch.frexp(v).mantissa.abs(), torch.full_like(v, 0.5))):
        raise CheckpointError(f"tensor {name}: per-tensor weight scale is not a power of two")


def validate_layer(prefix: str, tensors: Mapping[str, torch.Tensor], n: int, k: int, scheme: Scheme) -> None:
    """Check one layer's tensors against the contract; raise CheckpointError naming the tensor."""
    for name, (shape, dtypes) in expected_tensors(prefix, n, k, scheme).items():
        if name not in tensors:
            raise CheckpointError(f"layer {prefix}: missing tensor {name}")
        t = tensors[name]
        if t.dtype not in dtypes:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name}: shape {list(t.shape)}, expected {list(shape)} (layer [N, K] = [{n}, {k}])")
        if not name.endswith(PACKED):
            check_scale(name, t, scheme)
    if scheme.activation_scheme == "dynamic" and f"{prefix}.{INPUT_SCALE}" in tensors:
        raise CheckpointError(
            f"tensor {prefix}.{INPUT_SCALE} present but activation_scheme is 'dynamic': config and tensors disagree"
        )


def to_quantized_weight(prefix: str, tensors: Mapping[str, torch.Tensor], k: int, scheme: Scheme) -> QuantizedWeight:
    return QuantizedWeight(
        q=unpack_int4(tensors[f"{prefix}.{PACKED}"], k),
        group_scale=tensors[f"{prefix}.{GROUP_SCALE}"],
        weight_scale=tensors[f"{prefix}.{WEIGHT_SCALE}"],
        group_size=scheme.group(k),
    )


def layer_tensors(prefix: str, qw: QuantizedWeight, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors a writer stores for one quantized layer."""
    from vllm_dpq.packing import pack_int4

    out = {
        f"{prefix}.{PACKED}": pack_int4(qw.q),
        f"{prefix}.{GROUP_SCALE}": qw.group_scale.contiguous(),
        f"{prefix}.{WEIGHT_SCALE}": qw.weight_scale.float().reshape(-1).contiguous(),
    }
    if input_scale is not None:
        out[f"{prefix}.{INPUT_SCALE}"] = input_scale.float().reshape(1).contiguous()
    return out


# ----------------------------------------------------------------------------- reading


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def is_dpq_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_safetensors(folder: Path) -> TensorFiles:
    """Every tensor of the folder's *.safetensors files (sharded or not; no pickle, ever),
    each read from disk when accessed."""
    if not any(Path(folder).glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no *.safetensors files (DPQ checkpoints never use pickle/.bin)")
    try:
        return TensorFiles(folder)
    except TensorFileError as e:
        raise CheckpointError(str(e)) from None


def hf_model(path: Path, dtype: torch.dtype = torch.float32, meta: bool = False) -> torch.nn.Module:
    """The transformers model that config.json describes, without its quantization_config;
    meta: on the meta device (shapes only, nothing allocated)."""
    import contextlib

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta") if meta else contextlib.nullcontext():
        return unfuse_experts(AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False))


def check_model_shapes(path: Path, layers: Mapping[str, tuple[int, int]], tensors: TensorFiles) -> None:
    """config.json must describe the stored tensors: every parameter of the model it defines
    has a tensor of its shape (a quantized layer: its [N, K] in the manifest)."""
    try:
        model = hf_model(path, meta=True)
    except Exception as e:  # an architecture this transformers does not know: nothing to compare
        logging.getLogger("vllm_dpq").warning("%s: config.json not checked against the tensors (%s)", path, e)
        return
    unknown = sorted(layers.keys() - {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if unknown:
        raise CheckpointError(f"layer {unknown[0]}: in {MANIFEST}, not in config.json's model (config and tensors "
                              "disagree)")
    for name, p in model.named_parameters():
        prefix, shape = name.removesuffix(".weight"), tuple(p.shape)
        if prefix in layers:
            if layers[prefix] != shape:
                raise CheckpointError(f"layer {prefix}: [N, K] = {list(layers[prefix])} in {MANIFEST}, but "
                                      f"config.json's model has {list(shape)}: config and tensors disagree")
        elif name not in tensors:
            raise CheckpointError(f"tensor {name}: missing (config.json's {model.config.model_type} model has it)")
        elif tensors.info[name].shape != shape:
            raise CheckpointError(f"tensor {name}: shape {list(tensors.info[name].shape)}, but config.json's model "
                                  f"expects {list(shape)}: config and tensors disagree")


def check_finite(tensors: TensorFiles, skip: set[str]) -> None:
    """Every floating tensor (but skip) is finite; one tensor in memory at a time."""
    for name, info in tensors.info.items():
        if info.dtype.is_floating_point and name not in skip and not torch.isfinite(tensors[name]).all():
            raise CheckpointError(f"tensor {name}: contains NaN or Inf ({info.file.name})")


@dataclass
class Checkpoint:
    path: Path
    hf_config: dict[str, Any]
    config: DPQConfig
    layers: dict[str, tuple[int, int]]  # prefix -> (N, K)
    tensors: Mapping[str, torch.Tensor]  # read from disk on access (vllm_dpq.shards.TensorFiles)

    def quantized(self, prefix: str) -> QuantizedWeight:
        return to_quantized_weight(prefix, self.tensors, self.layers[prefix][1], self.config.scheme)

    def input_scale(self, prefix: str) -> torch.Tensor | None:
        return self.tensors.get(f"{prefix}.{INPUT_SCALE}")

    def unquantized_tensors(self) -> dict[str, torch.Tensor]:
        quant = {f"{p}.{s}" for p in self.layers for s in QUANT_SUFFIXES}
        return {k: v for k, v in self.tensors.items() if k not in quant}


def read_manifest(path: Path) -> dict[str, tuple[int, int]]:
    m = _load_json(path / MANIFEST)
    if not isinstance(m, dict) or m.get("format_version") not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{MANIFEST}: unsupported or missing format_version {m.get('format_version') if isinstance(m, dict) else None!r}"
        )
    layers = m.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{MANIFEST}: 'layers' must be a non-empty object")
    out = {}
    for name, info in layers.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise CheckpointError(f"{MANIFEST}: layer {name}: 'shape' must be [N, K] positive integers")
        out[name] = (shape[0], shape[1])
    return out


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read and fully validate a DPQ checkpoint folder (verify: check file hashes too)."""
    path = Path(path)
    hf_config = _load_json(path / "config.json")
    if not isinstance(hf_config, dict) or "quantization_config" not in hf_config:
        raise CheckpointError(f"{path / 'config.json'}: no quantization_config (not a DPQ checkpoint)")
    config = DPQConfig.from_dict(hf_config["quantization_config"])
    layers = read_manifest(path)
    recorded = _load_json(path / MANIFEST).get("scheme")
    if recorded is not None and recorded != config.scheme.to_dict():
        diff = sorted(k for k in set(recorded) | set(config.scheme.to_dict())
                      if recorded.get(k) != config.scheme.to_dict().get(k))
        raise CheckpointError(f"config.json and {MANIFEST} disagree on the numerics ({', '.join(diff)}): "
                              "config and tensors disagree")
    if verify:
        verify_files(path)
    tensors = load_safetensors(path)
    for prefix, (n, k) in layers.items():
        validate_layer(prefix, tensors, n, k, config.scheme)
        if f"{prefix}.weight" in tensors:
            raise CheckpointError(f"layer {prefix}: both a quantized and an unquantized weight are stored")
    known = {f"{p}.{s}" for p in layers for s in QUANT_SUFFIXES}
    stray = sorted(n for n in tensors if n.endswith(tuple("." + s for s in QUANT_SUFFIXES)) and n not in known)
    if stray:
        raise CheckpointError(f"tensor {stray[0]}: quantized tensor of a layer not in {MANIFEST}")
    check_finite(tensors, known)  # the scales were checked with their layers
    check_model_shapes(path, layers, tensors)
    return Checkpoint(path, hf_config, config, layers, tensors)


def write_folder_atomically(out: Path, overwrite: bool, write) -> Path:
    """Call write(tmp) on a temporary folder beside out, then rename it into place: an
    interrupted write never leaves a folder that looks complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, layers: Mapping[str, tuple[int, int]], scheme: Scheme | None = None) -> None:
    """Call after the tensor files are written: records each one's size and sha256, and the
    numerics the tensors were made for (checked against config.json on read)."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(path.glob("*.safetensors"))}
    data = {"format_version": FORMAT_VERSION, "layers": {k: {"shape": list(v)} for k, v in sorted(layers.items())},
            "files": files}
    if scheme is not None:
        data["scheme"] = scheme.to_dict()
    (path / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def verify_files(path: Path) -> None:
    """Sizes and sha256 of the tensor files against the manifest (detects any corruption)."""
    files = _load_json(path / MANIFEST).get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise CheckpointError(f"{MANIFEST}: 'files' must be an object")
    present = {f.name for f in path.glob("*.safetensors")}
    if present != set(files):
        raise CheckpointError(f"{MANIFEST}: lists tensor files {sorted(files)} but the folder has {sorted(present)}")
    for name, info in sorted(files.items()):
        f = path / name
        if not isinstance(info, dict) or f.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{name}: size {f.stat().st_size} differs from the manifest (truncated or altered)")
        if file_digest(f) != info.get("sha256"):
            raise CheckpointError(f"{name}: sha256 differs from the manifest (file corrupted or altered)")


__all__ = [
    "QUANT_METHOD", "FORMAT_VERSION", "MANIFEST", "CheckpointError", "DPQConfig", "Checkpoint",
    "read_checkpoint", "validate_layer", "expected_tensors", "layer_tensors", "write_manifest",
    "is_dpq_checkpoint", "is_ignored", "SCALE_DTYPES",
]
