"""``DPQModifier``: DPQ as an llm-compressor modifier, for ``oneshot`` Python and YAML recipes.

    from llmcompressor import oneshot
    from calibration.llmcompressor import DPQModifier

    oneshot(model=model, dataset=ds, recipe=[DPQModifier(group_size=128, ignore=["lm_head"])])
    model.save_pretrained("out", save_compressed=True)     # compressed-tensors W4A8-FP8

A thin adapter (docs/INTEROP.md, "DPQ inside llm-compressor"). llm-compressor does what it
does for its own ``GPTQModifier`` (this class is one): the calibration pipelines (sequential
onloading, disk offload), the Hessian hooks, the multi-GPU split of the layers, the
compressed-tensors config and ``save_pretrained``. Only the per-layer quantizer is replaced:
each layer's weight and accumulated Hessian go to the project's own ``quantize_layer`` with a
DPQ ``Recipe`` whose scales are in stock vLLM's folded form (``FoldedChain``, fold="vllm").
The layer gets back what compressed-tensors stores: the bf16 group scale
``S = bf16(s_w * s_g)`` as ``weight_scale`` and ``q * S`` as the weight, whose
``round(weight / S)`` at save is exactly DPQ's codes. Folding S at load (what stock vLLM's
CUTLASS W4A8 kernel does at group 128, and the DPQ plugin at every group size) gives back
exactly DPQ's (s_w, s_g), so the served weight is the ``s_w * fp8(q * s_g)`` that DPQ optimised.

Supported: llmcompressor 0.14.x (compressed-tensors 0.19). Needs no vLLM. Importing this
module registers ``DPQModifier`` with llm-compressor's ``ModifierFactory``, so YAML recipes
name it after an ``import calibration.llmcompressor``.
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
from compressed_tensors.utils import match_named_modules, update_offload_parameter
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from loguru import logger
from pydantic import field_validator, model_validator

from calibration.algorithms import CODES, PAPER_RECIPE, SCALE_SEARCHES, Recipe, quantize_layer
from vllm_dpq.interop.ct_format import CT_FORMAT
from vllm_dpq.interop.fold import export_group_scales, fold_fixed_point, folded_scheme
from vllm_dpq.numerics import expand_groups

__all__ = ["DPQModifier", "dpq_recipe"]


def dpq_recipe(group_size: int = 128, gar: bool | None = None, act_order: bool = False, scale_search: str | None = None,
               codes: str | None = None, paper_recipe: bool = False, damp: float = 0.01,
               block_size: int = 128) -> Recipe:
    """The project's DPQ ``Recipe`` a DPQModifier with these settings runs on each layer:
    scales in stock vLLM's folded form (per-channel fp32 s_w, FP8 s_g, dynamic activations).
    gar None: DPQ's default (on, unless act_order or the paper recipe)."""
    if gar and act_order:
        raise ValueError("gar and actorder are exclusive: drop one of the two")
    opts = dict(PAPER_RECIPE) if paper_recipe else dict(scale_search=scale_search, codes=codes)
    if act_order:
        opts["order"] = "act"
    elif gar is not None:
        opts["order"] = "gar" if gar else "none"
    # llm-compressor calibrates on one stream (the quantized model's): no GPTAQ correction
    opts["asym"] = False
    return Recipe(method="dpq", scheme=folded_scheme(group_size), damp=damp, block_size=block_size, fold="vllm", **opts)


class DPQModifier(GPTQModifier):
    """DPQ (W4A8-FP8, FP8-aware GPTQ) on the Hessians llm-compressor accumulates.

    Settings (the names of ``vllm-dpq quantize``'s options where llm-compressor has none):
    ``group_size`` (32, 64, 128; stock vLLM serves 128 only, the DPQ plugin all three),
    ``gar`` (group-aware reordering; on by default as in ``vllm-dpq quantize``, unless ``actorder``
    or ``paper_recipe``), ``actorder`` ("static": GPTQ act-order, fixed scales;
    ``--act-order``), ``scale_search`` ("mse" default, "max"), ``codes`` ("nearest" default,
    "round"), ``paper_recipe`` (max scales, rounded codes), ``dampening_frac`` (``--damp``),
    ``block_size``; and llm-compressor's ``targets`` and ``ignore``. The quantization scheme is
    fixed (int4 symmetric group weights, FP8 dynamic per-token activations, pack-quantized:
    llm-compressor's W4AFP8), so ``scheme`` and ``config_groups`` are refused. Layers are
    quantized one at a time (``batched_quantization`` is not used).
    """

    group_size: int = 128
    gar: bool | None = None  # None: DPQ's default (on)
    actorder: Literal["static"] | None = None
    scale_search: Literal[SCALE_SEARCHES] | None = None  # None: DPQ's default (mse)
    codes: Literal[CODES] | None = None  # None: DPQ's default (nearest)
    paper_recipe: bool = False

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"group_size must be positive (32, 64 or 128), got {value}; per-channel scales "
                             "have no folded form")
        return value

    @model_validator(mode="after")
    def _check_settings(self):
        if self.scheme is not None or self.config_groups is not None:
            raise ValueError("DPQModifier sets its quantization scheme itself (W4A8-FP8 at group_size): "
                             "drop scheme / config_groups")
        self.dpq_recipe()
        return self

    def dpq_recipe(self) -> Recipe:
        return dpq_recipe(self.group_size, self.gar, self.actorder is not None, self.scale_search, self.codes,
                          self.paper_recipe, self.dampening_frac or 0.0, self.block_size)

    def resolve_quantization_config(self) -> QuantizationConfig:
        """llm-compressor's W4AFP8 scheme at ``group_size``, saved pack-quantized (the config
        that stock vLLM's ``CompressedTensorsW4A8Fp8`` and the DPQ plugin read)."""
        scheme = preset_name_to_scheme("W4AFP8", list(self.targets))
        scheme.weights.group_size = self.group_size
        scheme.weights.actorder = None  # act-order here is DPQ's, with fixed scales: nothing to store
        scheme.format = CT_FORMAT
        scheme = self._apply_observer_overrides(scheme)
        return QuantizationConfig(config_groups={"group_0": scheme}, kv_cache_scheme=self.kv_cache_scheme,
                                  quantization_status=QuantizationStatus.INITIALIZED, ignore=self.ignore)

    def on_initialize(self, state, **kwargs) -> bool:
        # GPTQModifier applies its config only when one was given; DPQModifier's scheme always is
        self.initialize_quantization(state.model)
        self._module_names = {m: name for name, m in match_named_modules(state.model, self.resolved_targets,
                                                                          self.ignore)}
        return True

    def compress_module_list(self, module_list) -> None:
        """Quantize each calibrated module with DPQ (called per sequential layer, on each rank
        for its share of the modules under torchrun, like GPTQModifier's)."""
        recipe = self.dpq_recipe()
        for module in module_list:
            name = self._module_names[module]
            h = self._hessians.pop(module)
            h = h / self._num_samples.pop(module).to(h.device)
            logger.info(f"DPQ: quantizing {name}")
            with torch.no_grad(), disable_offloading():
                weight, scale = dpq_layer(module.weight, h, recipe, name)
                update_offload_parameter(module, "weight", weight)
                update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))


def dpq_layer(weight: torch.Tensor, h: torch.Tensor, recipe: Recipe, name: str = "layer"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized weight q * S in the weight's dtype, bf16 group scale S [N, G']) of one
    layer: the project's ``quantize_layer`` on (weight, h), expressed as compressed-tensors stores it."""
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: DPQModifier needs a bfloat16 or float32 model (the group scales are bf16 "
                         f"values, which {weight.dtype} cannot hold exactly); load the model in bfloat16")
    res = quantize_layer(weight.float(), h.to(weight.device), recipe)
    qw = res.qw
    if not bool(fold_fixed_point(qw.weight_scale, qw.group_scale).all()):  # FoldedChain guarantees it
        raise RuntimeError(f"{name}: DPQ scales are not a fixed point of the fold")
    s = export_group_scales(qw.weight_scale, qw.group_scale)  # bf16, exact fold fixed point
    k = weight.shape[1]
    w_q = qw.q.float() * expand_groups(s.float(), k, qw.group_size)
    return w_q.to(weight.dtype), s


ModifierFactory.register("DPQModifier", DPQModifier)
