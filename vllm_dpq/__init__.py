"""vllm-dpq: Dual Precision Quantization (W4A8-FP8) checkpoints and their vLLM plugin.

Importing this package does not import vLLM; ``vllm_dpq.plugin.register`` is the vLLM
entry point (``vllm.general_plugins``).
"""

__version__ = "0.1.0"
