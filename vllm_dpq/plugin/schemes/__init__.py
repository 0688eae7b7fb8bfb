"""One class per stored checkpoint format (the plugin's analogue of vLLM's compressed-tensors
schemes). ``DPQQuantConfig`` picks one from the checkpoint config, once; ``DPQLinearMethod``
delegates to it everything that depends on how the tensors are stored:

    quantizes(layer, prefix)   is this layer quantized in the checkpoint?
    create_weights(...)        the vLLM parameters that the checkpoint's tensors load into
    check_scale(name, t)       what a loaded scale must satisfy
    weights(layer)             the loaded tensors as the kernels' W4A8Weights

A new stored format is a new class here, not new branches elsewhere. MoE experts are stored
as DPQ layers, so ``DPQMoEMethod`` uses ``DPQScheme`` (``layout``, ``w4a8``) per expert.
"""

from vllm_dpq.plugin.schemes.base import StoredScheme, nan_filled
from vllm_dpq.plugin.schemes.compressed_tensors import CompressedTensorsW4A8Scheme
from vllm_dpq.plugin.schemes.dpq import DPQScheme

__all__ = ["StoredScheme", "DPQScheme", "CompressedTensorsW4A8Scheme", "nan_filled"]
