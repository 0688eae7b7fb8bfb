"""Block-wise tuning of rounding and group scales through the DPQ chain (``--tune``;
SignRound / AutoRound-style; docs/ALGORITHMS.md, "Accuracy levers").

After GPTQ / DPQ has quantized every Linear of a decoder layer, each Linear gets

    v  [N, K] in [-0.5, 0.5]      a rounding offset per weight
    a  [N, G] in [-A, A]           a group-scale multiplier 1 + a

and the layer's weights become the chain of those parameters,

    s'    = round_scale(s_g * (1 + a))                        (the stored scale dtype)
    q     = clamp(round(q0 * s_g / s' + v), -8, 7)            (q0: GPTQ's codes)
    W_eff = s_w * fp8(clamp(q * s', -fp8_max, fp8_max))       (vllm_dpq.numerics, unchanged)

At v = 0, a = 0 this is GPTQ's result bit for bit. Signed gradient descent (``v -= lr *
sign(dL/dv)``, lr decaying linearly from 0.3 / steps) minimises the mean squared error between
the layer's output and its full-precision output on the calibration batches, one batch per
step, with straight-through gradients across the three roundings (scale dtype, INT4, FP8).
The result is again INT4 codes, group scales in the stored dtype and the same s_w: the format,
the kernels and the reference forward serve it unchanged. A tuned layer whose loss over all
calibration batches is not below GPTQ's keeps GPTQ's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from vllm_dpq.numerics import (
    INT4_MAX, INT4_MIN, QuantizedWeight, Scheme, expand_groups, fp8_round, pack_result, round_scale,
)


FRAC = 0.499  # |start offset| < 1/2: round() gives GPTQ's code back at v = 0, a = 0
TUNE_STEPS = 50  # --tune: steps per decoder layer (measured on SmolLM2-135M, docs/RESULTS.md)
LR = 0.3  # default step of the offsets: LR / steps, decaying linearly (AutoRound's 1 / steps moved
# too many of GPTQ's codes: the loss rose on a test block, 150 steps)


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """The value of rounded, the gradient of x (straight-through estimate)."""
    return x + (rounded - x).detach()


@dataclass
class TunedLinear:
    """The tunable chain of one Linear, starting from GPTQ's codes and scales."""

    qw: QuantizedWeight
    w: torch.Tensor  # [N, K] the weight GPTQ rounded (its error-updated weight; else the original)
    scheme: Scheme
    max_shift: float
    scale_lr: float = 0.1  # the scale multipliers' step, relative to the offsets'

    def __post_init__(self):
        q0, s_g = self.qw.q.float(), self.qw.group_scale.float()
        n, k = q0.shape
        self.s_g, self.k, self.g = s_g, k, self.qw.group_size
        s_full = expand_groups(s_g, k, self.g)
        self.target = q0 * s_full  # exact in fp32 (int4 x bf16 / fp8 value)
        # where the rounded weight lies in its code's interval (AutoRound's W / s, anchored on what
        # GPTQ rounded): the offsets start at GPTQ's codes
        u = self.w.float() / self.qw.weight_scale.float().reshape(-1, 1) / s_full
        self.frac = (u - q0).clamp(-FRAC, FRAC) * s_full
        self.v = torch.zeros(n, k, device=q0.device, requires_grad=True)
        self.a = torch.zeros_like(s_g, requires_grad=True)

    def codes_and_scales(self, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.s_g * (1 + self.a)
        s = round_scale(raw.detach(), self.scheme.scale_dtype, self.scheme.fp8_max)
        s = _ste(raw, s) if ste else s
        x = (self.target + self.frac) / expand_groups(s, self.k, self.g) + self.v
        q = torch.round(x)
        q = (_ste(x, q) if ste else q).clamp(INT4_MIN, INT4_MAX)
        return q, s

    def w_eff(self) -> torch.Tensor:
        """s_w * fp8(clamp(q * s')), differentiable (straight-through) in v and a."""
        q, s = self.codes_and_scales(ste=True)
        prod = q * expand_groups(s, self.k, self.g)
        w8 = _ste(prod, fp8_round(prod.detach(), self.scheme.fp8_max))
        return self.qw.weight_scale.float().reshape(-1, 1) * w8

    def step(self, lr: float) -> None:
        with torch.no_grad():
            for p, bound, step in ((self.v, 0.5, lr), (self.a, self.max_shift, lr * self.scale_lr)):
                if p.grad is not None:
                    p -= step * torch.sign(p.grad)
                    p.clamp_(-bound, bound)
                    p.grad = None

    def result(self) -> QuantizedWeight:
        with torch.no_grad():
            q, s = self.codes_and_scales(ste=False)
        return pack_result(q.to(torch.int8), self.qw.weight_scale, s, self.scheme)


def _output(layer: nn.Module, weights: dict[str, torch.Tensor], hidden, kwargs) -> torch.Tensor:
    out = functional_call(layer, weights, (hidden,), kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


def _loss(layer, weights, batches, targets) -> float:
    with torch.no_grad():
        return sum((_output(layer, weights, h, kw).float() - t.float()).pow(2).sum().item()
                   for (h, kw), t in zip(batches, targets))


def tune_layer(layer: nn.Module, linears: dict[str, tuple[str, QuantizedWeight, torch.Tensor]], batches: list,
               targets: list,
               scheme: Scheme, steps: int = TUNE_STEPS, lr: float | None = None, max_shift: float = 0.2,
               progress=None) -> dict[str, QuantizedWeight]:
    """Tune the quantized Linears of one layer against the full-precision outputs.

    linears: name -> (the Linear's parameter path inside ``layer``, e.g. "self_attn.q_proj",
    its GPTQ result, the weight GPTQ rounded (``LayerResult.rounded``)); batches: [(hidden, kwargs)] the layer's calibration inputs; targets: the
    full-precision layer's outputs for them. The layer's own Linear weights are not used (its
    other parameters are). Returns name -> tuned QuantizedWeight (GPTQ's where tuning did not
    lower the loss over all batches)."""
    if steps <= 0 or not linears:
        return {name: qw for name, (_, qw, _) in linears.items()}
    lr = LR / steps if lr is None else lr
    dtype = next(layer.parameters()).dtype
    tuned = {name: TunedLinear(qw, w, scheme, max_shift) for name, (_, qw, w) in linears.items()}
    paths = {name: path for name, (path, _, _) in linears.items()}

    def weights(build) -> dict[str, torch.Tensor]:
        return {f"{paths[n]}.weight": build(t).to(dtype) for n, t in tuned.items()}

    start = _loss(layer, weights(lambda t: t.qw.dequantize(scheme.fp8_max)), batches, targets)
    frozen = {p: p.requires_grad for p in layer.parameters()}  # only v and a learn
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for i in range(steps):
                hidden, kwargs = batches[i % len(batches)]
                out = _output(layer, weights(TunedLinear.w_eff), hidden, kwargs)
                (out.float() - targets[i % len(batches)].float()).pow(2).mean().backward()
                for t in tuned.values():
                    t.step(lr * (1 - i / steps))
                if progress is not None:
                    progress(i)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    results = {name: t.result() for name, t in tuned.items()}
    end = _loss(layer, {f"{paths[n]}.weight": qw.dequantize(scheme.fp8_max).to(dtype) for n, qw in results.items()},
                batches, targets)
    return results if end < start else {name: qw for name, (_, qw, _) in linears.items()}
