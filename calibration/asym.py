"""Asymmetric calibration (GPTAQ / GPTQv2, arXiv 2504.02692; ``--asym-calib``): the statistics
and the correction term that the GPTQ engine (calibration/algorithms.py) adds to its updates.
docs/ALGORITHMS.md, "Accuracy levers"."""

from __future__ import annotations

import torch


def asym_term(dxxt: torch.Tensor, hinv: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's P = alpha * triu(dXX^T U^T, 1) U (U: upper Cholesky factor of H^-1), in the
    processing order: quantizing column j with pre-quantization value w_j adds w_j P[j, j+1:]
    to the later columns, which corrects the input difference that column carries."""
    return alpha * torch.triu(dxxt @ hinv.t(), diagonal=1) @ hinv


def asym_update(h: torch.Tensor, dxxt: torch.Tensor, count: int, x: torch.Tensor,
                x_fp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GPTAQ's statistics over paired rows: H = 2/n sum x x^T as ``hessian_update``, and the
    cross term dXX^T = 2/n sum (x_fp - x) x^T (x: the quantized model's input, x_fp: the
    full-precision model's input for the same tokens); returns (H, dXX^T, n)."""
    from calibration.algorithms import hessian_update  # which imports this module

    x = x.reshape(-1, x.shape[-1]).float()
    d = x_fp.reshape(-1, x_fp.shape[-1]).float() - x
    m = x.shape[0]
    dxxt *= count / (count + m)
    c = 2 / (count + m)
    dxxt += (d * c).t() @ x
    h, n = hessian_update(h, count, x)
    return h, dxxt, n
