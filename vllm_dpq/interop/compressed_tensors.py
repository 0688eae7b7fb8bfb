"""DPQ <-> compressed-tensors W4A8-FP8, and stock vLLM's scale folding (docs/INTEROP.md).

compressed-tensors W4A8-FP8 is what llm-compressor writes for its ``W4AFP8`` preset, saved
``pack-quantized``: per quantized Linear ``P``

    P.weight_packed  int32 [N, ceil(K/8)]   INT4 codes q, nibble q + 8 (our layout, packing.py)
    P.weight_scale   bf16  [N, ceil(K/G)]   group scale S in the weight's own units: W ~ q * S
    P.weight_shape   int64 [2]              [N, K]
(symmetric: no zero point; no g_idx), config ``weights``: int 4 bit symmetric group 128,
``input_activations``: float 8 bit dynamic per token.

Stock vLLM (``CompressedTensorsW4A8Fp8`` -> ``CutlassW4A8LinearKernel``, Hopper only) does not
compute with S. At load it *folds* S into an FP8 group scale and an fp32 per-channel scale
(``convert_bf16_scales_to_fp8`` in ``vllm/model_executor/layers/quantization/utils/quant_utils.py``,
called from ``CutlassW4A8LinearKernel.process_weights_after_loading``), per output row n:

    c[n]     = max(max_g |S[n, g]| / 448, 1 / (448 * 512))      fp32 (dynamic per-token FP8 quant
    t[n, g]  = fp8(clamp(S[n, g] / c[n], +-448))                 of the scale matrix, one row = one
                                                                 "token": QuantFP8 PER_TOKEN)
    s8[n, g] = fp8(t[n, g] / 8)                                  the FP8 group scale the GEMM uses
    chan[n]  = 8 * c[n]                                          the fp32 per-channel scale

and the CUTLASS mixed-input GEMM looks ``fp8(q * s8)`` up in a table built by
``cutlass_pack_scale_fp8`` (entries ``float_e4m3(float(s8) * v)``, v = -8..-1, positive codes
by negation), so the weight it multiplies is

    W_stock = chan * fp8(q * s8)                       (fp8 = round to nearest even, e4m3fn)

which is exactly our chain ``W_eff = s_w * fp8(q * s_g)`` with s_w = chan (fp32, per channel,
not a power of two) and s_g = s8 (FP8). Hence:

- import (``--quantization dpq`` on a compressed-tensors checkpoint, or
  ``import_compressed_tensors``): s_w := chan, s_g := s8 reproduces stock vLLM's H100 weights
  bit for bit, on any device and at any group size (the fold is the same rule at every G).
- export (``export_compressed_tensors``): S := bf16(s_w * s_g). Stock vLLM re-folds it, which is
  the identity only when each row's largest s_g is 56 (= 448 / 8) and s_w is that row's fold
  channel scale: the "folded" calibration variant (``FoldedChain``) produces exactly such
  scales, so its checkpoints serve bit-identically in stock vLLM; other DPQ checkpoints are
  re-rounded (``ExportReport`` measures by how much).

Division: the CUDA kernel (``dynamic_per_token_scaled_fp8_quant``) computes ``S / c`` (IEEE fp32
division, vLLM builds without fast-math); vLLM's PyTorch fallback ``QuantFP8.forward_native``
computes ``S * (1 / c)``. ``division="ieee"`` (default) models the GPU, ``"reciprocal"`` the
fallback; they differ only when S / c lands within an fp32 ulp of an FP8 rounding midpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from vllm_dpq.format import (
    write_folder_atomically,
    MANIFEST, CheckpointError, DPQConfig, check_scale, layer_tensors, load_safetensors, read_checkpoint,
    write_manifest,
)
from vllm_dpq.numerics import FP8_DTYPE, FP8_E4M3_MAX, QuantizedWeight, Scheme, expand_groups, fp8_weight
from vllm_dpq.packing import PACK_FACTOR, packed_cols, unpack_int4

logger = logging.getLogger("vllm_dpq.interop")

CT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
CT_PACKED, CT_SCALE, CT_SHAPE = "weight_packed", "weight_scale", "weight_shape"
CUTLASS_GROUP = 128  # CutlassW4A8LinearKernel: group_size 128 only
CUTLASS_ALIGN = 128  # ... and K, N (per partition) multiples of 128
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_E4M3_MAX * 512.0)  # vLLM's min per-token FP8 scale
LUT_HEADROOM = 8.0  # vLLM divides the FP8 group scale by 8 so that 8 * s8 <= 448
FOLDED_MAX = FP8_E4M3_MAX / LUT_HEADROOM  # 56: the largest group scale of a folded row
# vLLM's packed_modules_mapping for Llama-style models: the shards of one GEMM
MERGED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
EXPORT_REPORT = "dpq_export.json"
DIVISIONS = ("ieee", "reciprocal")


class InteropError(ValueError):
    """A checkpoint cannot be converted or served as asked; the message says why."""


# ============================================================================ the folding


def fold_group_scales(scales: torch.Tensor, division: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Stock vLLM's load-time folding of compressed-tensors group scales.

    scales [..., G'] (bf16 in checkpoints; any float dtype, read exactly as fp32) ->
    (s8 float8_e4m3fn [..., G'], chan fp32 [..., 1]) with ``S ~ chan * s8``. Bit-exact model of
    ``convert_bf16_scales_to_fp8(QuantFP8(dynamic, PER_TOKEN), scales)``.
    """
    if division not in DIVISIONS:
        raise ValueError(f"division must be one of {DIVISIONS}, got {division!r}")
    s = scales.float()
    amax = s.abs().amax(dim=-1, keepdim=True)
    c = torch.clamp(amax / FP8_E4M3_MAX, min=FP8_MIN_SCALING_FACTOR)
    x = s / c if division == "ieee" else s * c.reciprocal()
    t = x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    s8 = (t.float() / LUT_HEADROOM).to(FP8_DTYPE)
    return s8, c * LUT_HEADROOM


def folded_effective_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                            division: str = "ieee") -> torch.Tensor:
    """The weight stock vLLM's CUTLASS W4A8 GEMM multiplies: chan * fp8(q * s8), fp32 [N, K].

    q: INT4 codes [N, K] (int8), scales: the checkpoint's group scales S [N, ceil(K/G)]."""
    s8, chan = fold_group_scales(scales, division)
    k = q.shape[1]
    return chan * fp8_weight(q, expand_groups(s8.float(), k, group_size), FP8_E4M3_MAX)


def w4a16_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """compressed-tensors' own dequantization ``bf16(q * S)`` (what ``decompress`` returns)."""
    k = q.shape[1]
    return (q.to(scales.dtype) * expand_groups(scales, k, group_size)).to(scales.dtype)


def export_group_scales(s_w: torch.Tensor, s_g: torch.Tensor) -> torch.Tensor:
    """Our (s_w [1] or [N], s_g [N, G']) -> compressed-tensors' bf16 S = s_g * s_w.

    Exact when s_w is a power of two (DPQ's s_w) and s_g is bf16 or FP8."""
    return (s_g.float() * s_w.float().reshape(-1, 1)).to(torch.bfloat16)


def fold_fixed_point(s_w: torch.Tensor, s_g: torch.Tensor, division: str = "ieee") -> torch.Tensor:
    """Per row: does exporting (s_w, s_g) and folding it again give back exactly (s_w, s_g)?
    True for every row means stock vLLM computes our W_eff bit for bit."""
    n = s_g.shape[0]
    s8, chan = fold_group_scales(export_group_scales(s_w, s_g), division)
    same_g = (s8.float() == s_g.float()).all(dim=1)
    same_w = chan.reshape(-1) == s_w.float().reshape(-1).expand(n)
    return same_g & same_w


def ct_scales_to_dpq(scales: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors S -> our (s_g float8_e4m3fn [N, G'], s_w fp32 [N]) for serving.

    Group strategy: the fold, so that W_eff = stock vLLM's H100 weight (any group size).
    Channel strategy (one scale per row; stock vLLM has no W4A8 path for it): s_w = S, s_g = 1,
    which is exact: W_eff = S * fp8(q) = S * q (every INT4 code is an FP8 value)."""
    if per_channel:
        return torch.ones_like(scales, dtype=torch.float32).to(FP8_DTYPE), scales.float().reshape(-1)
    s8, chan = fold_group_scales(scales)
    return s8, chan.reshape(-1)


# ============================================================================ calibration variant


def folded_scheme(group_size: int = CUTLASS_GROUP) -> Scheme:
    """The DPQ scheme of the folded variant: per-channel fp32 s_w, FP8 group scales, FP8 e4m3fn
    (448), dynamic per-token activations (the only activations stock vLLM's W4A8 path has)."""
    return Scheme(group_size=group_size, fp8_max=FP8_E4M3_MAX, weight_scale="channel",
                  group_scale_dtype="float8_e4m3fn", activation_scheme="dynamic")


def folded_channel_scale(anchor: torch.Tensor) -> torch.Tensor:
    """chan [N] for rows whose largest group scale (in weight units) is ``anchor`` [N]: the value
    vLLM derives from that bf16 scale, 8 * max(bf16(anchor) / 448, 1 / (448 * 512))."""
    a = anchor.float().to(torch.bfloat16).float()
    return torch.clamp(a / FP8_E4M3_MAX, min=FP8_MIN_SCALING_FACTOR) * LUT_HEADROOM


def pin_row_max(s8: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    """Make (chan, s8) a fixed point of the fold: every row whose channel scale is not vLLM's
    minimum needs a group scale of exactly 56 (its largest group is set to 56; none exceeds it)."""
    s8 = s8.clone()
    pin = chan.reshape(-1) / LUT_HEADROOM > FP8_MIN_SCALING_FACTOR
    rows = torch.nonzero(pin).flatten()
    s8[rows, s8[rows].argmax(dim=1)] = FOLDED_MAX
    return s8


def _make_folded_chain():
    from calibration.algorithms import Chain

    class FoldedChain(Chain):
        """The DPQ chain with scales in stock vLLM's folded form (calibration variant).

        Stock vLLM re-expresses every row's group scales as chan * s8 with s8 FP8 and the row's
        largest s8 = 56, whatever the checkpoint holds. This chain fits its scales directly in
        that form: chan from the row's largest group (bf16, as vLLM derives it), each group's
        s8 on the FP8 grid (``max`` or ``mse`` search of the parent, capped at 56), the largest
        pinned to 56. Such (s_w = chan, s_g = s8) are a fixed point of the fold, so the grid is
        the parent's unchanged: ``grid(s_w, s_g) = s_w * fp8(CODE * s_g)`` IS what vLLM's GEMM
        computes, and GPTQ's error feedback compensates exactly the served chain.

        Use with ``folded_scheme()`` and without ``refit_scales`` (a refit could lower a
        pinned row maximum; export re-checks the fixed point and reports any row that is not).
        The per-row fold is over the full K: exact for tensor-parallel 1 and for column-parallel
        layers at any TP; a row-parallel layer at TP > 1 is folded per rank by vLLM.
        """

        def __init__(self, scheme: Scheme, fp8_aware: bool = True, scale_search: str = "max",
                     codes: str = "round"):
            problems = folded_scheme_problems(scheme)
            if problems:
                raise ValueError("FoldedChain needs folded_scheme(): " + "; ".join(problems))
            super().__init__(scheme, fp8_aware, scale_search, codes)

        def fit(self, w: torch.Tensor, diag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            n, k = w.shape
            g = self.scheme.group(k)
            pad = (-k) % g
            groups = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, g)
            d = None if diag is None else torch.nn.functional.pad(diag, (0, pad)).reshape(-1, g)
            chan = folded_channel_scale(2 * w.abs().amax(dim=1) / 15)  # max-based scale, top group
            s8 = self.group_scale(groups, chan, d)
            if self.scale_search != "max":  # re-anchor chan on the searched scale of the top group
                chan = folded_channel_scale(chan * s8.amax(dim=1))
                s8 = self.group_scale(groups, chan, d)
            return chan, pin_row_max(s8, chan)

    return FoldedChain


def folded_scheme_problems(scheme: Scheme) -> list[str]:
    out = []
    if scheme.weight_scale != "channel":
        out.append("weight_scale must be 'channel' (vLLM's channel scale is fp32, not a power of two)")
    if scheme.group_scale_dtype != "float8_e4m3fn":
        out.append("group_scale_dtype must be 'float8_e4m3fn'")
    if scheme.fp8_max != FP8_E4M3_MAX:
        out.append(f"fp8_max must be {FP8_E4M3_MAX:g}")
    return out


_FOLDED_CHAIN = None


def __getattr__(name: str):  # FoldedChain imports calibration lazily: serving never needs it
    global _FOLDED_CHAIN
    if name == "FoldedChain":
        if _FOLDED_CHAIN is None:
            _FOLDED_CHAIN = _make_folded_chain()
        return _FOLDED_CHAIN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ============================================================================ config


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


# ============================================================================ export


@dataclass
class LayerReport:
    shape: tuple[int, int]
    exact: bool  # stock vLLM's weight == our W_eff, bit for bit
    rows_refolded: int  # rows whose scales are not a fixed point of the fold
    mismatched: int  # weights that differ
    max_abs_err: float  # max |W_stock - W_eff|
    rel_err: float  # ||W_stock - W_eff|| / ||W_eff||
    scales_exact: bool  # S = s_w * s_g exactly in bf16


@dataclass
class ExportReport:
    source: str
    output: str
    exact: bool
    layers: dict[str, LayerReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    preset: str = "W4AFP8"

    def summary(self) -> str:
        n = len(self.layers)
        inexact = [k for k, v in self.layers.items() if not v.exact]
        if self.preset == "W4A16":
            return (f"{n} layers exported as W4A16 (no FP8 rounding); bf16(q * s_w * s_g) exact in "
                    f"{n - len(inexact)} of {n} layers")
        if not inexact:
            return f"{n} layers exported; stock vLLM computes our effective weights bit for bit"
        worst = max(inexact, key=lambda k: self.layers[k].rel_err)
        total = sum(v.shape[0] * v.shape[1] for v in self.layers.values())
        frac = sum(v.mismatched for v in self.layers.values()) / total
        return (f"{n} layers exported; stock vLLM re-rounds the scales of {len(inexact)} layers "
                f"({frac:.2%} of weights differ; worst {worst}: relative error {self.layers[worst].rel_err:.2e}). "
                "Calibrate with the folded variant for a bit-exact export.")

    def to_dict(self) -> dict:
        return asdict(self)


def _merge_key(name: str) -> tuple[str, int] | None:
    head, _, proj = name.rpartition(".")
    for i, members in enumerate(MERGED):
        if proj in members:
            return head, i
    return None


def check_cutlass_shapes(layers: Mapping[str, tuple[int, int]]) -> list[str]:
    """Why stock vLLM's CUTLASS W4A8 kernel (TP 1) cannot take these layers: K and the merged N
    of each GEMM must be multiples of 128, and merged shards must all be quantized."""
    problems = []
    merged: dict[tuple[str, int], list[str]] = {}
    for name, (n, k) in sorted(layers.items()):
        if k % CUTLASS_ALIGN:
            problems.append(f"{name}: K = {k} is not a multiple of {CUTLASS_ALIGN}")
        key = _merge_key(name)
        if key is None:
            if n % CUTLASS_ALIGN:
                problems.append(f"{name}: N = {n} is not a multiple of {CUTLASS_ALIGN}")
        else:
            merged.setdefault(key, []).append(name)
    for (head, i), names in sorted(merged.items()):
        n = sum(layers[x][0] for x in names)
        if n % CUTLASS_ALIGN:
            problems.append(f"{head}.{{{','.join(MERGED[i])}}}: merged N = {n} is not a multiple of {CUTLASS_ALIGN}")
    return problems


def _merged_partially_quantized(quantized: set[str], linears: list[str]) -> list[str]:
    problems = []
    for name in linears:
        key = _merge_key(name)
        if key is None or name in quantized:
            continue
        siblings = [f"{key[0]}.{m}" for m in MERGED[key[1]] if f"{key[0]}.{m}" in quantized]
        if siblings:
            problems.append(f"{name} is not quantized but {siblings[0]} is: vLLM fuses them into one GEMM "
                            "that must have one scheme")
    return problems


def _linear_names(hf_config: Mapping[str, Any]) -> list[str] | None:
    """Names of every nn.Linear of the model (built on the meta device), or None if the
    architecture cannot be built here."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = {k: v for k, v in hf_config.items() if k not in ("quantization_config", "model_type")}
        config = AutoConfig.for_model(hf_config["model_type"], **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the DPQ ignore list
        logger.warning("cannot build the model on the meta device (%s): ignore list = DPQ ignore list", e)
        return None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _copy_side_files(src: Path, dst: Path) -> None:
    skip = {"config.json", MANIFEST, "model.safetensors.index.json", EXPORT_REPORT}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)


def export_compressed_tensors(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
                              exact: bool = False, overwrite: bool = False, w4a16: bool = False) -> ExportReport:
    """DPQ checkpoint -> compressed-tensors W4A8-FP8 checkpoint that stock vLLM serves with its
    own ``CompressedTensorsW4A8Fp8`` scheme (Hopper), no plugin needed.

    Refused always: group size != 128, K or (merged) N not multiples of 128, merged projections
    only partly quantized, scales that are not finite positive in bf16.
    Refused unless ``force``: static activations (stock vLLM's W4A8 path is dynamic per token
    only: the input scales are dropped) and fp8_max != 448 (stock vLLM uses e4m3fn's 448).
    ``exact``: refuse unless stock vLLM computes our effective weights bit for bit (true for
    checkpoints calibrated with the folded variant, ``FoldedChain``).

    ``w4a16``: write the W4A16 preset instead (same INT4 codes, bf16 scales S = s_w * s_g, no
    FP8 anywhere: weights ``bf16(q * S)``, bf16 activations), which stock vLLM serves with its
    int4 weight-only kernels (CPU included) at any group size: a different model from the DPQ
    W4A8 one (the FP8 rounding the codes were calibrated for is skipped), for comparisons.
    """
    src, out = Path(ckpt_dir), Path(out_dir)
    ckpt = read_checkpoint(src)
    scheme = ckpt.config.scheme
    target = "W4A16" if w4a16 else "W4A8-FP8 for stock vLLM"
    problems = []
    if not w4a16:
        if scheme.group_size != CUTLASS_GROUP:
            problems.append(f"group size {scheme.group_size} (stock vLLM's W4A8 kernel needs {CUTLASS_GROUP})")
        problems += check_cutlass_shapes(ckpt.layers)
    linears = _linear_names(ckpt.hf_config)
    if linears is not None:
        missing = sorted(set(ckpt.layers) - set(linears))
        if missing:
            problems.append(f"{missing[0]} is not an nn.Linear of the {ckpt.hf_config.get('model_type')} model")
        problems += _merged_partially_quantized(set(ckpt.layers), linears)
    if problems:
        raise InteropError(f"{src}: cannot export to compressed-tensors {target}: " + "; ".join(problems))
    forced = []
    if scheme.activation_scheme == "static" and not w4a16:
        forced.append("static activation scales (stock vLLM quantizes activations dynamically per token; "
                      "the input scales are dropped)")
    if scheme.fp8_max != FP8_E4M3_MAX and not w4a16:
        forced.append(f"fp8_max {scheme.fp8_max:g} (stock vLLM uses {FP8_E4M3_MAX:g})")
    if forced and not force:
        raise InteropError(f"{src}: numerics stock vLLM cannot reproduce: " + "; ".join(forced)
                           + ". Pass force=True (--force) to export anyway.")

    report = ExportReport(source=str(src), output=str(out), exact=True, notes=[f"forced: {f}" for f in forced],
                          preset="W4A16" if w4a16 else "W4AFP8")
    if w4a16:
        report.notes.append("W4A16: weights bf16(q * s_w * s_g), no FP8 rounding, bf16 activations")
    tensors = dict(ckpt.unquantized_tensors())
    for prefix, (n, k) in sorted(ckpt.layers.items()):
        qw = ckpt.quantized(prefix)
        s_bf16 = export_group_scales(qw.weight_scale, qw.group_scale)
        try:
            check_scale(f"{prefix}.{CT_SCALE}", s_bf16)
        except CheckpointError as e:
            raise InteropError(f"{e} after conversion to bf16 S = s_w * s_g") from None
        product = qw.group_scale.double() * qw.weight_scale.double().reshape(-1, 1)  # exact in float64
        if w4a16:  # ours: bf16(s_w * q * s_g); stock: bf16(q * S)
            ours = (expand_groups(product.float(), k, scheme.group(k)) * qw.q.float()).to(torch.bfloat16)
            stock, refolded = w4a16_weight(qw.q, s_bf16, scheme.group(k)), 0
        else:  # ours: W_eff; stock: the fold of S, then the FP8 lookup
            ours = qw.dequantize(scheme.fp8_max)
            stock = folded_effective_weight(qw.q, s_bf16, CUTLASS_GROUP)
            refolded = int((~fold_fixed_point(qw.weight_scale, qw.group_scale)).sum())
        diff = (stock.float() - ours.float()).abs()
        lr = LayerReport(
            shape=(n, k), exact=bool(torch.equal(stock, ours)), rows_refolded=refolded,
            mismatched=int((diff > 0).sum()), max_abs_err=float(diff.max()),
            rel_err=float(diff.norm() / ours.float().norm().clamp(min=1e-30)),
            scales_exact=bool((s_bf16.double() == product).all()),
        )
        report.layers[prefix] = lr
        report.exact &= lr.exact
        tensors[f"{prefix}.{CT_PACKED}"] = ckpt.tensors[f"{prefix}.weight_packed"].contiguous()  # same layout
        tensors[f"{prefix}.{CT_SCALE}"] = s_bf16.contiguous()
        tensors[f"{prefix}.{CT_SHAPE}"] = torch.tensor([n, k], dtype=torch.int64)
    if exact and not report.exact:
        raise InteropError(f"{src}: not bit-exact in stock vLLM: {report.summary()}")
    if linears is not None:  # every Linear that is not quantized, by name
        ignore = sorted(set(linears) - set(ckpt.layers))
    else:
        ignore = sorted(set(ckpt.config.ignore) | {"lm_head"})
        report.notes.append("ignore list copied from the DPQ config (model not buildable on the meta device)")
    qconfig = compressed_tensors_config(ignore, scheme.group_size if w4a16 else CUTLASS_GROUP, report.preset)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = dict(ckpt.hf_config)
        hf["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        _copy_side_files(src, tmp)
        (tmp / EXPORT_REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")

    write_folder_atomically(out, overwrite, write)
    logger.info("%s", report.summary())
    return report


# ============================================================================ import (offline)


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
        _copy_side_files(src, tmp)
        write_manifest(tmp, {p: (lay.n, lay.k) for p, lay in layers.items()})

    out = write_folder_atomically(Path(out_dir), overwrite, write)
    read_checkpoint(out)  # validate what was written
    return out


# ============================================================================ serving (vLLM side)
# Used by vllm_dpq.plugin when --quantization dpq is given for a compressed-tensors checkpoint.


def vllm_ct_config(cfg: Mapping[str, Any]):
    """vLLM's own CompressedTensorsConfig for the checkpoint, used only for its layer matching
    (targets, ignore, regexes, fused shards), so the plugin quantizes exactly the layers stock
    vLLM would."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    return CompressedTensorsConfig.from_config(copy.deepcopy(dict(cfg)))


def ct_layer_quantized(ct, packed_modules_mapping, layer, prefix: str) -> bool:
    """Does the compressed-tensors config quantize this layer? Non-linear layers that it would
    quantize (embeddings, lm_head) are refused."""
    from vllm.model_executor.layers.linear import LinearBase

    ct.packed_modules_mapping = packed_modules_mapping
    scheme = ct.get_scheme_dict(layer, prefix)
    quantized = bool(scheme and scheme.get("weights") is not None)
    if quantized and not isinstance(layer, LinearBase):
        raise NotImplementedError(f"--quantization dpq: compressed-tensors quantizes {prefix} "
                                  f"({type(layer).__name__}); only Linear layers are supported")
    return quantized


def ct_create_weights(layer, n: int, k: int, scheme: Scheme, loader, track) -> None:
    """The checkpoint's tensors as vLLM parameters. weight_scale is held in fp32 (exact for
    bf16/fp16 checkpoints) and starts as NaN, so a missing tensor is caught at load end."""
    from vllm.model_executor.parameter import (
        BasevLLMParameter, ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter,
    )

    packed = PackedvLLMParameter(data=torch.zeros(n, packed_cols(k), dtype=torch.int32), input_dim=1,
                                 output_dim=0, packed_dim=1, packed_factor=PACK_FACTOR, weight_loader=loader)
    if scheme.group_size == -1:
        scale = ChannelQuantScaleParameter(data=torch.full((n, 1), float("nan")), output_dim=0,
                                           weight_loader=loader)
    else:
        scale = GroupQuantScaleParameter(data=torch.full((n, scheme.num_groups(k)), float("nan")),
                                         output_dim=0, input_dim=1, weight_loader=loader)
    layer.register_parameter(CT_PACKED, track(packed))
    layer.register_parameter(CT_SCALE, track(scale))
    # [N, K] of the checkpoint projection; stock vLLM ignores it too
    layer.register_parameter(CT_SHAPE, BasevLLMParameter(data=torch.zeros(2, dtype=torch.int64),
                                                         weight_loader=loader))


def ct_weights_after_loading(layer, k: int, scheme: Scheme):
    """Load-time conversion: S -> (s_g = s8, s_w = chan) by stock vLLM's fold, on this rank's
    slice (as stock vLLM does). Returns the W4A8Weights for the DPQ backends."""
    from vllm_dpq.kernels import W4A8Weights

    s8, chan = ct_scales_to_dpq(layer.weight_scale.data, scheme.group_size == -1)
    layer.weight_group_scale_fp8, layer.weight_chan_scale = s8, chan  # for inspection and tests
    return W4A8Weights(packed=layer.weight_packed.data, group_scale=s8, weight_scale=chan, input_scale=None,
                       k=k, group_size=scheme.group(k), fp8_max=FP8_E4M3_MAX)


__all__ = [
    "CT_METHOD", "InteropError", "fold_group_scales", "folded_effective_weight", "w4a16_weight",
    "export_group_scales", "fold_fixed_point", "ct_scales_to_dpq", "folded_scheme", "folded_channel_scale",
    "pin_row_max", "FoldedChain", "is_compressed_tensors_config", "w4a8_fp8_args",
    "scheme_from_compressed_tensors", "dpq_config_from_compressed_tensors", "compressed_tensors_config",
    "export_compressed_tensors", "ExportReport", "import_compressed_tensors", "read_compressed_tensors",
    "check_cutlass_shapes",
]
