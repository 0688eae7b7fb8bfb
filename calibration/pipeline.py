"""Sequential, layer-by-layer calibration.

For each decoder layer i, on the compute device alone:
  pass 1: run the layer on its inputs (outputs of the already-quantized layers 0..i-1),
          accumulating one Hessian per distinct Linear input (q/k/v share one, gate/up one);
  quantize every Linear of the layer (rtn / gptq / dpq) and put W_eff in its place;
  (--asym-calib: pass 1 also runs the layer on the full-precision model's inputs, kept as a
          second stream, for GPTAQ's cross term (X_fp - X) X^T beside each Hessian)
  pass 2: run the quantized layer: its outputs feed layer i+1, and the max |input| of each
          Linear gives the static activation scale s_x = amax / fp8_max.
Memory: one decoder layer on the device, plus the calibration activations of one layer. A
streamed model (calibration.model.load_model) reads each layer from the source checkpoint
when it is calibrated and drops it after; with a CalibrationState, each finished layer's
results go to its work folder and leave memory, so host memory does not grow with depth.
MoE layers (vllm_dpq.moe): each expert projection is a Linear like any other, calibrated on
the tokens routed to it (Recipe.experts="all": on every token); experts that saw fewer than
Recipe.expert_min_tokens fall back (docs/ALGORITHMS.md, "Mixture of experts").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from calibration import CalibrationError
from calibration.algorithms import Recipe, hessian_update, quantize_layer
from calibration.asym import asym_update
from calibration.model import (
    LayerInputs, ResidentWeights, capture_first_layer_inputs, decoder_layers, layers_prefix, quantizable_linears,
)
from vllm_dpq.moe import expert_siblings, moe_blocks, unfuse_experts
from vllm_dpq.numerics import QuantizedWeight, quantize_activation
from vllm_dpq.shards import bound_heap, trim_heap

logger = logging.getLogger("calibration")
# Linears never quantized in a model type. DeepSeek-V3's MLA: vLLM folds kv_b_proj into its
# attention as a dequantized weight (it never runs as a Linear), so it could not compute W4A8.
KEPT_BY_TYPE = {"deepseek_v3": ("kv_b_proj",)}


@dataclass
class QuantizedLayer:
    qw: QuantizedWeight
    input_amax: float  # max |x| of the layer's input over the calibration set (quantized model)


@dataclass
class CalibrationResult:
    # in memory, or (with a CalibrationState) read back from its work folder one layer at a time
    layers: Mapping[str, QuantizedLayer] = field(default_factory=dict)
    layer_errors: list[float] = field(default_factory=list)  # relative output error per decoder layer
    # MoE: tokens routed to each expert of each block (in the quantized model), and the expert
    # Linears that saw fewer than recipe.expert_min_tokens -> what fell back: "rtn" (too few in
    # the Hessian pass), "scale" (too few routed: static scale from the siblings)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    expert_fallbacks: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def stats(self) -> dict:
        """What a resumed run needs besides the layers (JSON)."""
        return {"errors": self.layer_errors, "expert_tokens": self.expert_tokens,
                "expert_fallbacks": self.expert_fallbacks}

    def restore(self, stats: dict) -> None:
        self.layer_errors = list(stats["errors"])
        self.expert_tokens = dict(stats["expert_tokens"])
        self.expert_fallbacks = dict(stats["expert_fallbacks"])


def _hooked(linears: dict[str, nn.Linear], fn):
    """Forward pre-hooks calling fn(name, x) once per distinct input tensor per batch.
    ``seen`` keeps each input alive until cleared, so a freed tensor's memory cannot be
    reused by a later input with the same address within one batch."""
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    share: dict[str, str] = {}

    def make(name):
        def hook(_mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            rep = seen.setdefault(key, (name, x))[0]
            share[name] = rep
            if rep == name:
                fn(name, x)
        return hook

    handles = [lin.register_forward_pre_hook(make(name)) for name, lin in linears.items()]
    return handles, seen, share


class _Stop(Exception):
    """Raised by a pass-1 hook once the pass has the inputs it needs: the rest of the layer need not run."""


def calibrate_layer(layer: nn.Module, prefix: str, inputs: LayerInputs, recipe: Recipe, ignore: list[str],
                    result: CalibrationResult) -> float:
    """Quantize one decoder layer in place; replace inputs.hidden by its outputs. Returns the
    layer's relative output error (quantized vs unquantized layer, same inputs; NaN for rtn)."""
    linears = quantizable_linears(layer, prefix, ignore)
    hess: dict[str, tuple[torch.Tensor, int]] = {}
    cross: dict[str, torch.Tensor] = {}  # GPTAQ's (X_fp - X) X^T per distinct input (--asym-calib)
    fp_x: dict[str, torch.Tensor] = {}  # the full-precision model's inputs of the current batch
    fp8_max = recipe.scheme.fp8_max
    asym = recipe.asym and inputs.fp_hidden is not None
    blocks = moe_blocks(layer)
    # true-sequential: one pass per group of Linears sharing an input, in the order they run (dense
    # layers; an MoE layer's experts would each be a group, so its Linears come from one pass)
    sequential = recipe.true_sequential and not blocks
    if recipe.true_sequential and blocks:
        logger.info("%s: an MoE layer, its Linears quantized from one pass (not true-sequential)", prefix)
    order: list[str] = []  # the input representatives (first Linear of each shared input), as they ran
    want: set[str] = set()  # the representatives whose statistics this pass accumulates (empty: all)
    state = {"fp": False, "stop": False}
    originals: dict[str, torch.Tensor] = {}  # true-sequential + asym: quantized Linears' original weights

    def accumulate(name, x):
        if sequential and name not in order:
            order.append(name)
            if not want:  # the first pass: the first input that runs
                want.add(name)
        if want and name not in want:
            return
        if state["fp"]:
            fp_x[name] = x
        else:
            if recipe.hessian_fp8:
                x8, s_x = quantize_activation(x.reshape(-1, x.shape[-1]), None, fp8_max)
                x = (x8 * s_x).reshape(x.shape)
            h, n = hess.get(name, (torch.zeros(x.shape[-1], x.shape[-1], device=x.device), 0))
            x_fp = fp_x.pop(name, None)
            # routed experts see other tokens in the two models: no pairing, plain GPTQ for them
            if x_fp is not None and x_fp.shape == x.shape and expert_siblings(name) == name:
                h, cross[name], n = asym_update(h, cross.get(name, torch.zeros_like(h)), n, x, x_fp)
                hess[name] = (h, n)
            else:
                hess[name] = hessian_update(h, n, x)
        if state["stop"]:
            raise _Stop

    def run(hidden, kwargs, fp: bool):
        """The layer on one batch (fp: with its original weights); None where a hook stopped it."""
        state["fp"] = fp
        swapped = {n: linears[n].weight.data for n in originals} if fp else {}
        for n in swapped:
            linears[n].weight.data = originals[n]
        seen.clear()
        try:
            with torch.no_grad():
                out = layer(hidden, **kwargs)
            return out[0] if isinstance(out, tuple) else out
        except _Stop:
            return None
        finally:
            for n, w in swapped.items():
                linears[n].weight.data = w
            state["fp"] = False

    def pass1(first: bool):
        """Hessians (and cross terms) of ``want`` over every batch. The first pass runs the whole
        unquantized layer (the reference outputs, the fp stream's next inputs); a later one stops
        once ``want``'s inputs have run through the Linears quantized so far."""
        state["stop"] = not first
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs[prefix])):
            if asym:  # first the full-precision model's inputs (kept in fp_x), then the quantized one's
                out = run(inputs.fp_hidden[b], kwargs, fp=True)
                if first:
                    fp_next.append(out)
            out = run(hidden, kwargs, fp=False)
            if first:
                reference.append(out)
            fp_x.clear()

    def starved(name: str, tokens: int) -> bool:  # only experts can see too few tokens
        return expert_siblings(name) != name and tokens < recipe.expert_min_tokens

    fallback = replace(recipe, method="rtn", scale_search=None, codes=None, refit_scales=None, asym=False,
                       true_sequential=False, tune_steps=0)
    tunable: dict[str, tuple[str, QuantizedWeight]] = {}  # --tune: GPTQ's results, on the device

    def quantize(names):
        for name in names:
            h, n = hess.get(share.get(name), (None, 0)) if recipe.needs_hessian else (None, 0)
            use = recipe
            if recipe.needs_hessian and starved(name, n):
                use, h = fallback, None
                result.expert_fallbacks.setdefault(name, []).append("rtn")
                logger.info("%s: %d calibration tokens (< %d): rtn", name, n, recipe.expert_min_tokens)
            res = quantize_layer(linears[name].weight.data.float(), h, use,
                                 cross.get(share.get(name)) if cross and use is recipe else None)
            if recipe.tune_steps and use is recipe:
                tunable[name] = (name[len(prefix) + 1:], res.qw, res.rounded)
            if sequential and asym:  # the fp stream's later passes run the original weights
                originals[name] = linears[name].weight.data
            linears[name].weight.data = res.w_eff.to(device=linears[name].weight.device,
                                                     dtype=linears[name].weight.dtype)
            _store(result, name, res.qw)
            del res
            trim_heap()  # the quantizer's temporaries, freed: back to the OS before the next Linear

    reference, fp_next = [], []  # pass 1 (skipped by rtn, which needs no Hessian: no layer error then)
    share: dict[str, str] = {}
    if recipe.needs_hessian:
        handles, seen, share = _hooked(linears, accumulate)
        for experts in blocks.values():
            experts.route_all = recipe.experts == "all"
        try:
            pass1(first=True)
            if sequential:  # each later group from inputs through the groups quantized before it
                for rep in order:
                    if rep not in want:
                        want.clear()
                        want.add(rep)
                        pass1(first=False)
                    quantize([n for n in linears if share.get(n) == rep])
                    hess.pop(rep, None)
                    cross.pop(rep, None)
        finally:
            for h in handles:
                h.remove()
            for experts in blocks.values():
                experts.route_all = False
        if asym:
            inputs.fp_hidden = fp_next
    quantize([n for n in linears if n not in result.layers])  # all, or (true-sequential) those that never ran
    hess.clear()
    cross.clear()
    originals.clear()
    if tunable:  # against the full-precision model's outputs where kept (--asym-calib), else the layer's own
        from calibration.tune import tune_layer

        targets = inputs.fp_hidden if asym else reference
        tuned = tune_layer(layer, tunable, list(zip(inputs.hidden, inputs.kwargs[prefix])), targets,
                           recipe.scheme, recipe.tune_steps)
        for name, qw in tuned.items():
            linears[name].weight.data = qw.dequantize(fp8_max).to(linears[name].weight.dtype)
            _store(result, name, qw)
        del tunable, tuned

    tokens: dict[str, int] = {}

    def record(name, x):
        entry = result.layers[name]
        entry.input_amax = max(entry.input_amax, x.detach().abs().max().item())
        tokens[name] = tokens.get(name, 0) + x[..., 0].numel()

    handles, seen, share = _hooked(linears, record)
    err_num = err_den = 0.0
    try:
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs[prefix])):
            seen.clear()
            with torch.no_grad():
                out = layer(hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if reference:
                err_num += (out.float() - reference[b].float()).pow(2).sum().item()
                err_den += reference[b].float().pow(2).sum().item()
                reference[b] = None
            inputs.hidden[b] = out
    finally:
        for h in handles:
            h.remove()
    for name, rep in share.items():  # layers sharing an input share its amax
        result.layers[name].input_amax = result.layers[rep].input_amax
        tokens[name] = tokens[rep]
    _expert_scales(linears, tokens, starved, result)
    for name, experts in blocks.items():  # an expert's tokens: those its first projection saw
        result.expert_tokens[f"{prefix}.{name}"] = [tokens.get(f"{prefix}.{name}.{e}.{x.names[0]}", 0)
                                                    for e, x in enumerate(experts)]
    return (err_num / err_den) ** 0.5 if err_den else float("nan")


def _store(result: CalibrationResult, name: str, qw: QuantizedWeight) -> None:
    """A Linear's codes and scales to the host: one copy per Linear, none per column."""
    result.layers[name] = QuantizedLayer(replace(qw, q=qw.q.cpu(), group_scale=qw.group_scale.cpu(),
                                                 weight_scale=qw.weight_scale.cpu()), 0.0)


def _expert_scales(linears, tokens: dict[str, int], starved, result: CalibrationResult) -> None:
    """An expert projection that saw too few tokens takes the largest input amax of the same
    projection of the block's other experts (its own, from a few tokens or none, would clip
    the first inputs routed to it at inference)."""
    siblings: dict[str, list[str]] = {}
    for name in linears:
        siblings.setdefault(expert_siblings(name), []).append(name)
    for key, names in siblings.items():
        if key in names:  # not an expert projection
            continue
        amax = max(result.layers[n].input_amax for n in names)
        for n in names:
            if starved(n, tokens.get(n, 0)):
                result.layers[n].input_amax = amax
                result.expert_fallbacks.setdefault(n, []).append("scale")


def calibrate(model: nn.Module, samples: torch.Tensor, recipe: Recipe, ignore: list[str],
              device: str | torch.device = "cpu", batch_size: int = 8, progress: bool = True,
              state=None, resume: bool = False, weights=None) -> CalibrationResult:
    """Quantize every Linear inside the decoder layers of model (in place: weights become W_eff).

    weights: where the layers' parameters come from (calibration.model.StreamedWeights for a
    streamed model; default: the model is in memory). state: a calibration.resume.CalibrationState
    committing each finished layer (its results then live in the work folder, not in memory);
    with resume=True, continue after its last committed layer."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    weights = weights or ResidentWeights()
    bound_heap()
    t0 = time.perf_counter()
    unfuse_experts(model)  # MoE: one nn.Linear per expert projection, under the checkpoint's names
    ignore = [*ignore, *KEPT_BY_TYPE.get(model.config.model_type, ())]
    layers, prefix = decoder_layers(model), layers_prefix(model)
    if not any(quantizable_linears(layer, f"{prefix}.{i}", ignore) for i, layer in enumerate(layers)):
        raise CalibrationError(f"no Linear layer to quantize in the decoder layers (ignore list: {ignore})")
    batches = list(samples.split(batch_size))
    inputs = capture_first_layer_inputs(model, batches, device)
    if recipe.asym:  # the embeddings are not quantized: both streams start equal
        inputs.fp_hidden = list(inputs.hidden)
    result = CalibrationResult()
    start = 0
    saved = state.load() if state is not None and resume else None
    if saved is not None:
        done, stats, hidden = saved
        result.restore(stats)
        hidden = [h.to(device) for h in hidden]
        if recipe.asym:  # committed as [quantized stream..., full-precision stream...]
            hidden, inputs.fp_hidden = hidden[:len(batches)], hidden[len(batches):]
        inputs.hidden = hidden
        start = done + 1
        logger.warning("resuming after layer %d of %d", done, len(layers))
    elif state is not None:
        state.start()
    bar = tqdm(range(start, len(layers)), desc=f"{recipe.method} layers", unit="layer", disable=not progress,
               initial=start, total=len(layers))
    for i in bar:
        weights.load(layers[i], f"{prefix}.{i}.", device)
        before = set(result.layers)
        err = calibrate_layer(layers[i], f"{prefix}.{i}", inputs, recipe, ignore, result)
        weights.release(layers[i])
        trim_heap()
        result.layer_errors.append(err)
        if state is not None:
            done = {n: result.layers.pop(n) for n in result.layers.keys() - before}
            state.commit(i, done, result.stats(), inputs.hidden + (inputs.fp_hidden or []))
        if err == err:  # rtn measures no layer error (nan)
            bar.set_postfix(err=f"{err:.4f}")
            logger.info("layer %d: relative output error %.5f", i, err)
    if state is not None:
        result.layers = state.layers()
    result.seconds = time.perf_counter() - t0
    return result
