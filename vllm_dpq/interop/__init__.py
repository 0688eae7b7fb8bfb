"""Interoperability with other checkpoint formats (docs/INTEROP.md).

``vllm_dpq.interop.compressed_tensors``: DPQ <-> compressed-tensors W4A8-FP8 (llm-compressor's
``W4AFP8`` preset, ``pack-quantized``), both directions, and the model of stock vLLM's
load-time scale folding. Importable without vLLM (the vLLM-side helpers import it lazily).
"""
