"""INT4 packing: 8 codes per int32 along K, compressed-tensors' own layout.

Code c in -8..7 is stored as the nibble c + 8; nibble i of an int32 holds column 8*j + i.
K not a multiple of 8 is padded with nibble 0 (code -8), which readers slice away.
"""

from __future__ import annotations

import torch

PACK_FACTOR = 8


def packed_cols(k: int) -> int:
    return -(-k // PACK_FACTOR)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 codes in -8..7 -> [N, ceil(K/8)] int32."""
    if q.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("INT4 codes must lie in -8..7")
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:  # e.g. a GPU box with torch + Triton only: the same layout, by hand
        return _pack_int4_local(q)
    return pack_to_int32(q, num_bits=4, packed_dim=1).contiguous()


def _pack_int4_local(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    nib = torch.nn.functional.pad((q.to(torch.int32) + 8), (0, (-k) % PACK_FACTOR)).reshape(n, -1, PACK_FACTOR)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int32)
    return (nib << shifts).sum(dim=2, dtype=torch.int32).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/8)] int32 -> [N, K] int8 codes (vectorised; equals compressed-tensors' unpack)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed weight must be int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(packed.shape[0], -1)[:, :k] - 8).to(torch.int8)


def unpack_int4_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """compressed-tensors' unpack, for tests."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits=4, shape=torch.Size([packed.shape[0], k]), packed_dim=1)
