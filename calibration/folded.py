"""The folded quantizer: the DPQ chain with scales in stock vLLM's folded form, so that a
checkpoint exported to compressed-tensors serves bit-identically in stock vLLM
(``--target compressed-tensors``; the fold math is ``vllm_dpq.interop.fold``)."""

from __future__ import annotations

import torch

from calibration.algorithms import Chain
from vllm_dpq.interop.fold import folded_channel_scale, folded_scheme_problems, pin_row_max
from vllm_dpq.numerics import Scheme, group_view


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
        g = self.scheme.group(w.shape[1])
        groups, d = group_view(w, g), None if diag is None else group_view(diag, g)
        chan = folded_channel_scale(2 * w.abs().amax(dim=1) / 15)  # max-based scale, top group
        s8 = self.group_scale(groups, chan, d)
        if self.scale_search != "max":  # re-anchor chan on the searched scale of the top group
            chan = folded_channel_scale(chan * s8.amax(dim=1))
            s8 = self.group_scale(groups, chan, d)
        return chan, pin_row_max(s8, chan)
