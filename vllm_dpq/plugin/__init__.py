"""vLLM plugin: serves DPQ checkpoints (``quant_method: "dpq"``) with no extra flag.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(front end, engine core, each worker), so it is idempotent: the quantization config is
registered by importing ``config`` once per process. vLLM is imported only here, inside
``vllm_dpq.plugin``; the rest of ``vllm_dpq`` works without it.
"""

from __future__ import annotations

import logging


def share_vllm_log_handlers() -> None:
    """Show ``vllm_dpq`` log lines (backend choice, warnings) in vLLM's log, same format. Called
    at registration and again before the plugin's first log line: vLLM 0.32 configures its
    logging only when it builds an engine, after it loaded the plugins in that process (an
    engine run in the caller's process, VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    ours, vllm = logging.getLogger("vllm_dpq"), logging.getLogger("vllm")
    if ours.handlers or not vllm.handlers:  # configured by the user or already shared, or vLLM logging is off
        return
    for h in vllm.handlers:
        ours.addHandler(h)
    ours.setLevel(vllm.level)
    ours.propagate = False


def register() -> None:
    from vllm_dpq.plugin import config  # noqa: F401  (registers "dpq" on first import)

    share_vllm_log_handlers()
    from vllm_dpq.kernels.cpu import request_amx

    request_amx()  # in every vLLM process: its bf16 CPU attention runs AMX tiles without asking
