"""The project's environment variables: one naming rule, one reader.

They are named ``DPQ_*`` (``DPQ_BACKEND``, ``DPQ_CPU_GEMM``, ``DPQ_CPU_ISA``, ``DPQ_CACHE``,
``DPQ_DEBUG``, ``DPQ_TRITON_*``): vLLM warns "Unknown vLLM environment variable detected" about
every ``VLLM_``-prefixed name it does not know. The names of earlier releases (``VLLM_DPQ_*``)
are still read when the new one is unset, with a deprecation warning once per name.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping

logger = logging.getLogger("vllm_dpq")

PREFIX = "DPQ_"
OLD_PREFIX = "VLLM_"  # VLLM_DPQ_X: the name DPQ_X had before


@functools.cache
def _deprecated(old: str, new: str) -> None:
    logger.warning("%s is deprecated (vLLM warns about it as an unknown vLLM variable): use %s", old, new)


def get(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """$name (a ``DPQ_*`` name), else the deprecated $VLLM_<name>, else ``default``."""
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r}: the project's variables are named {PREFIX}*")
    env = os.environ if environ is None else environ
    if name in env:
        return env[name]
    old = OLD_PREFIX + name
    if old in env:
        _deprecated(old, name)
        return env[old]
    return default
