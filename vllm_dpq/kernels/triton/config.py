"""Triton backend configuration: kernel tile configs, the table that picks one by M, and the
backend's environment variables, read and validated once per layer, in ``prepare``
(``TritonSettings.from_env``), never per call. Needs no triton.

Environment (resolved at load; the result travels in the state, and into the custom op as
plain arguments):

* ``DPQ_TRITON_CONFIG="BM,BN,BK,SPLIT,WARPS,STAGES[,UNPACK]"``: one fused-kernel config
  for every M instead of the table (tuning).
* ``DPQ_TRITON_DEQUANT_M`` (default 1024): from this M on, with bf16 activations,
  ``linear`` dequantizes the weight to FP8 once per call (a memory-bound kernel) and runs one
  ``torch._scaled_mm`` (cuBLASLt FP8) instead of the fused kernel: at large M the GEMM
  dominates and the dequantization costs about 325/M of it on an H100, so cuBLASLt's FP8 GEMM
  is expected to win there (not yet measured: benchmarks/gemm.py times both paths at every M
  so the threshold can be set from data). Same numerics. A huge value keeps the fused kernel.
* ``DPQ_TRITON_RNE`` = ``auto`` (default), ``hw`` or ``emulate``: which FP8 roundings use
  the exact integer emulation and which the hardware conversion (``rne_modes``).

Configs: a small table by M (``CONFIG_TABLE``/``pick_config``): BLOCK_M 16-64 with split-K
for decode, larger tiles for prefill. Choosing the row by M happens per call (M changes per
call); it reads no environment.

Offline checks (tests/test_triton_kernel.py): the table's configs compile with Triton's own
ptxas for sm_89, sm_90, sm_100 (and sm_120) without register spills; sm_90 uses wgmma
e4m3 from BLOCK_M 64 (mma.sync with an exact fp8->f16 upcast below), sm_89/sm_120 mma.sync
e4m3, sm_100 tcgen05 f8f6f4.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from vllm_dpq import env as dpq_env

ENV_RNE = "DPQ_TRITON_RNE"  # "auto" (default), "hw" or "emulate": see rne_modes()
ENV_CONFIG = "DPQ_TRITON_CONFIG"
ENV_DEQUANT_M = "DPQ_TRITON_DEQUANT_M"  # M from which dequantize + torch._scaled_mm is used
DEFAULT_DEQUANT_M = 1024
RNE_MODES = ("auto", "hw", "emulate")
SPLIT_K_CHOICES = (1, 2, 4, 8, 16)
UNPACK_MODES = ("reshape", "gather")


def interpreting(environ: Mapping[str, str] | None = None) -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    env = os.environ if environ is None else environ
    return env.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TritonConfig:
    """One launch configuration of the fused GEMM kernel.

    ``unpack``: "reshape" (default) loads each packed word once, expands [BK/8, BN] ->
    [BK/8, 8, BN] by shifts and reshapes to [BK, BN]; "gather" loads each word once per nibble
    and shifts by 4*(k % 8): simpler, but Triton's pipeliner stages the 8x duplicated loads in
    shared memory (about 5x the shared memory, more registers). Both give identical tiles."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    unpack: str = "reshape"  # or "gather"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.block_k < 32:
            raise ValueError("block_k must be >= 32 (FP8 MMA instruction K)")
        if self.split_k not in SPLIT_K_CHOICES:
            raise ValueError(f"split_k must be one of {SPLIT_K_CHOICES}, got {self.split_k}")
        if self.unpack not in UNPACK_MODES:
            raise ValueError(f"unpack must be 'gather' or 'reshape', got {self.unpack!r}")

    def to_ints(self) -> list[int]:
        """The config as a list of ints (a custom-op argument); ``from_ints`` inverts it."""
        return [self.block_m, self.block_n, self.block_k, self.split_k, self.num_warps, self.num_stages,
                self.group_m, UNPACK_MODES.index(self.unpack)]

    @classmethod
    def from_ints(cls, values) -> TritonConfig:
        bm, bn, bk, split, warps, stages, group_m, unpack = (int(v) for v in values)
        return cls(bm, bn, bk, split, warps, stages, group_m, UNPACK_MODES[unpack])


def parse_config(spec: str | None) -> TritonConfig | None:
    """$DPQ_TRITON_CONFIG ("BM,BN,BK,SPLIT,WARPS,STAGES[,UNPACK]") -> a config, or None if unset."""
    if not spec:
        return None
    parts = [p.strip() for p in spec.split(",")]
    try:
        bm, bn, bk, split, warps, stages = (int(p) for p in parts[:6])
    except ValueError as e:
        raise ValueError(f"{ENV_CONFIG}={spec!r}: expected BM,BN,BK,SPLIT,WARPS,STAGES[,UNPACK]") from e
    unpack = parts[6] if len(parts) > 6 else "reshape"
    return TritonConfig(bm, bn, bk, split, warps, stages, unpack=unpack)


def parse_dequant_m(raw: str | None) -> int:
    """$DPQ_TRITON_DEQUANT_M -> the smallest M served by dequantize-to-FP8 + torch._scaled_mm
    instead of the fused kernel (default 1024)."""
    raw = str(DEFAULT_DEQUANT_M) if raw is None else raw
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_DEQUANT_M}={raw!r}: expected an integer (M threshold)") from e


def rne_modes(mode: str = "auto", interpreter: bool = False) -> tuple[bool, bool]:
    """(activation kernel emulates RNE, weight tiles emulate RNE) for $DPQ_TRITON_RNE = mode.

    auto (default): activations always use the exact integer emulation (the activation kernel
    is memory-bound, so it costs nothing, and it does not depend on how a Triton version lowers
    fp32 -> e4m3: Triton 3.6 on sm_89 goes through a round-toward-zero fp16, which mis-rounds
    about 0.2% of arbitrary fp32 values); weight tiles use the hardware conversion, which is
    exact for them on every lowering because q * s_g has at most 11 significant bits (and any
    product below 2**-14 rounds to 0 either way). hw / emulate: both hardware / both emulated.
    Under Triton's interpreter both always emulate (its own conversion is wrong)."""
    if mode not in RNE_MODES:
        raise ValueError(f"{ENV_RNE}={mode!r}: choose 'auto', 'hw' or 'emulate'")
    if interpreter:
        return True, True
    return mode != "hw", mode == "emulate"


@dataclass(frozen=True)
class TritonSettings:
    """The backend's environment, resolved once per layer (in ``prepare``)."""

    config: TritonConfig | None  # $DPQ_TRITON_CONFIG: the fused kernel's config at every M
    dequant_m: int  # $DPQ_TRITON_DEQUANT_M
    emulate_act_rne: bool  # $DPQ_TRITON_RNE (and the interpreter): see rne_modes()
    emulate_weight_rne: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TritonSettings:
        """Read and validate the three variables (a bad value raises here, at load)."""
        read = functools.partial(dpq_env.get, environ=environ)
        act, weight = rne_modes(read(ENV_RNE, "auto"), interpreting(environ))
        return cls(parse_config(read(ENV_CONFIG)), parse_dequant_m(read(ENV_DEQUANT_M)), act, weight)


# M bucket -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Chosen from offline
# compiles (triton 3.9, ptxas from its wheel) for sm_89, sm_90, sm_100 and sm_120 at group
# sizes 32 and 128: none spills registers. Below BLOCK_M 64 Triton uses mma.sync (on SM90/100
# through an exact fp8->f16 upcast); from BLOCK_M 64 wgmma (SM90) / tcgen05 (SM100) FP8.
CONFIG_TABLE = (
    (16, (16, 64, 64, 4, 4)),
    (32, (32, 128, 64, 4, 4)),
    (64, (64, 64, 64, 4, 4)),
    (256, (64, 128, 128, 8, 3)),
    (None, (128, 128, 64, 8, 2)),
)


def pick_config(m: int, n: int, k: int, num_sms: int = 132) -> TritonConfig:
    """The heuristic table. Decode (small M) is bound by the weight stream: small BLOCK_M and
    split-K so that about two programs per SM stream INT4 words; the split-K workspace
    (SPLIT*M*N*4 bytes, written and read once) is kept under a quarter of the weight bytes.
    Prefill is bound by the FP8 MMA and the dequantization ALU work: bigger tiles amortise the
    dequantization of each weight tile over BLOCK_M rows. (The $DPQ_TRITON_CONFIG override
    is applied by the caller, from ``TritonSettings.config``.)"""
    for limit, (bm, bn, bk, warps, stages) in CONFIG_TABLE:
        if limit is None or m <= limit:
            break
    cfg = TritonConfig(bm, bn, bk, num_warps=warps, num_stages=stages)
    if m <= 64:
        tiles = -(-m // bm) * -(-n // bn)
        k_tiles = -(-k // bk)
        want = -(-2 * num_sms // tiles)  # programs needed for ~2 per SM
        cap_ws = max(1, k // (32 * m))  # SPLIT*M*N*4 <= (N*K/2) / 4
        cap = min(want, cap_ws, max(1, k_tiles // 2), SPLIT_K_CHOICES[-1])
        cfg = replace(cfg, split_k=max(s for s in SPLIT_K_CHOICES if s <= cap))
    return cfg
