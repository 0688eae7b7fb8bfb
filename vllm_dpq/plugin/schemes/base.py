"""What every stored scheme provides (see the package docstring)."""

from __future__ import annotations

import torch

from vllm_dpq.format import DPQConfig
from vllm_dpq.kernels import W4A8Weights
from vllm_dpq.numerics import Scheme


def nan_filled(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The "never loaded" sentinel of every scale parameter (caught by check_scale at load end)."""
    return torch.full(shape, float("nan"), dtype=dtype)


class StoredScheme:
    dpq: DPQConfig  # the checkpoint's config (for a compressed-tensors import: its DPQ equivalent)
    scheme: Scheme  # the W4A8 numerics the layers compute with

    def apply_vllm_mapper(self, mapper) -> None:
        """Map checkpoint names in the layer selection to vLLM's module names."""

    def quantizes(self, layer: torch.nn.Module, prefix: str, packed_modules_mapping: dict) -> bool:
        raise NotImplementedError

    def create_weights(self, n: int, k: int, shards: int, loader) -> dict[str, torch.nn.Parameter]:
        """Parameters for a layer of [N, K] per partition made of ``shards`` checkpoint projections."""
        raise NotImplementedError

    def check_scale(self, name: str, t: torch.Tensor) -> None:
        """Raise CheckpointError if a loaded scale tensor is missing (NaN) or invalid."""
        raise NotImplementedError

    def weights(self, layer: torch.nn.Module, on_mismatch) -> W4A8Weights:
        """The loaded parameters as W4A8Weights. on_mismatch(msg, *args) warns once."""
        raise NotImplementedError
