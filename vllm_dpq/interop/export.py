"""DPQ checkpoint -> compressed-tensors W4A8-FP8 (or W4A16) checkpoint for stock vLLM, with a
report of how exactly stock vLLM reproduces our effective weights (docs/INTEROP.md)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from vllm_dpq.format import CheckpointError, check_scale, read_checkpoint, write_folder_atomically
from vllm_dpq.interop.ct_format import (
    CT_PACKED, CT_SCALE, CT_SHAPE, EXPORT_REPORT, InteropError, compressed_tensors_config, copy_side_files,
)
from vllm_dpq.interop.fold import (
    CUTLASS_GROUP, export_group_scales, fold_fixed_point, folded_effective_weight, w4a16_weight,
)
from vllm_dpq.moe import expert_siblings, router_names, unfuse_experts
from vllm_dpq.numerics import FP8_E4M3_MAX, expand_groups

logger = logging.getLogger("vllm_dpq.interop")

CUTLASS_ALIGN = 128  # CutlassW4A8LinearKernel: K, N (per partition) multiples of 128
CUTLASS_MOE_ALIGN = 256  # CompressedTensorsW4A8Fp8MoEMethod: hidden, intermediate (per partition)
# vLLM's packed_modules_mapping for Llama-style models: the shards of one GEMM
MERGED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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
    """Why stock vLLM's CUTLASS W4A8 kernels (TP 1) cannot take these layers: K and the merged N
    of each GEMM must be multiples of 128, and merged shards must all be quantized; MoE experts
    (CompressedTensorsW4A8Fp8MoEMethod) need hidden and intermediate sizes, i.e. every expert
    projection's N and K, multiples of 256. One problem per projection of all experts."""
    problems = []
    merged: dict[tuple[str, int], list[str]] = {}
    experts: dict[str, tuple[int, int]] = {}
    for name, (n, k) in sorted(layers.items()):
        if expert_siblings(name) != name:
            experts[expert_siblings(name)] = n, k
            continue
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
    for name, (n, k) in experts.items():
        if n % CUTLASS_MOE_ALIGN or k % CUTLASS_MOE_ALIGN:
            problems.append(f"{name}: [N, K] = [{n}, {k}]: stock vLLM's W4A8 MoE needs hidden and intermediate "
                            f"sizes that are multiples of {CUTLASS_MOE_ALIGN}")
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
            model = unfuse_experts(AutoModelForCausalLM.from_config(config))
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the DPQ ignore list
        logger.warning("cannot build the model on the meta device (%s): ignore list = DPQ ignore list", e)
        return None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] + router_names(model)


def export_compressed_tensors(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
                              exact: bool = False, overwrite: bool = False, w4a16: bool = False) -> ExportReport:
    """DPQ checkpoint -> compressed-tensors W4A8-FP8 checkpoint that stock vLLM serves with its
    own ``CompressedTensorsW4A8Fp8`` scheme (Hopper), no plugin needed.

    Refused always: group size != 128, K or (merged) N not multiples of 128 (MoE experts: 256),
    merged projections only partly quantized, scales that are not finite positive in bf16.
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
        copy_side_files(src, tmp)
        (tmp / EXPORT_REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")

    write_folder_atomically(out, overwrite, write)
    logger.info("%s", report.summary())
    return report
