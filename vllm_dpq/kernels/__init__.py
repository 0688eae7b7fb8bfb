"""W4A8-FP8 GEMM backends behind one dispatch function. Importable with torch alone.

    weights = W4A8Weights(packed, group_scale, weight_scale, input_scale, k, group_size, fp8_max)
    backend = select_backend(weights, device)          # checks the layout; or DPQ_BACKEND=<name>
    state   = backend.prepare(weights)                 # once, at load
    y       = backend.apply(state, x, bias)            # every forward

Every backend computes DPQ spec section 1 exactly (up to fp32 summation order); the tests
hold each against ``vllm_dpq.numerics.reference_linear``.
"""

from __future__ import annotations

import logging

import torch

from vllm_dpq import env
from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.kernels.cpu import CpuBackend
from vllm_dpq.kernels.scaled_mm import ScaledMMBackend
from vllm_dpq.kernels.triton import TritonBackend

logger = logging.getLogger("vllm_dpq")

ENV_BACKEND = "DPQ_BACKEND"

BACKENDS: dict[str, Backend] = {b.name: b for b in (CpuBackend(), ScaledMMBackend(), TritonBackend())}
# preference order per device type; the first that supports the layer wins
PREFERENCE = {"cpu": ("cpu",), "cuda": ("triton", "scaled_mm")}


def select_backend(weights: W4A8Weights, device: torch.device | str, override: str | None = None) -> Backend:
    """Pick the backend for one layer. ``override`` (or $DPQ_BACKEND) forces one; a
    forced backend that cannot compute this layer's numerics on this device is an error."""
    weights.check()
    device = torch.device(device)
    forced = override or env.get(ENV_BACKEND) or None
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r}: unknown backend; choose from {sorted(BACKENDS)}")
        reason = BACKENDS[forced].unsupported(weights, device)
        if reason:
            raise ValueError(f"backend {forced!r} cannot run this layer: {reason}")
        return BACKENDS[forced]
    reasons = []
    for name in PREFERENCE.get(device.type, ()):
        reason = BACKENDS[name].unsupported(weights, device)
        if reason is None:
            return BACKENDS[name]
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"no DPQ backend for device {device}: " + ("; ".join(reasons) or "device type not supported"))


__all__ = ["Backend", "W4A8Weights", "BACKENDS", "select_backend", "ENV_BACKEND"]
