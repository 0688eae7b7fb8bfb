"""Interoperability with compressed-tensors W4A8-FP8 (llm-compressor's ``W4AFP8`` preset,
``pack-quantized``), both directions (docs/INTEROP.md). Torch and compressed-tensors only: the
vLLM side of the import is the plugin's compressed-tensors scheme.

    fold.py       stock vLLM's load-time scale folding, as math
    ct_format.py  the compressed-tensors config (parse, write) and reading its checkpoints
    export.py     DPQ -> compressed-tensors, with an exactness report
    ct_import.py  compressed-tensors -> DPQ
"""

from vllm_dpq.interop.ct_format import (
    CT_METHOD, InteropError, compressed_tensors_config, dpq_config_from_compressed_tensors,
    is_compressed_tensors_config, read_compressed_tensors, scheme_from_compressed_tensors, w4a8_fp8_args,
)
from vllm_dpq.interop.ct_import import import_compressed_tensors
from vllm_dpq.interop.export import ExportReport, check_cutlass_shapes, export_compressed_tensors
from vllm_dpq.interop.fold import (
    DIVISIONS, ct_scales_to_dpq, export_group_scales, fold_fixed_point, fold_group_scales, folded_channel_scale,
    folded_effective_weight, folded_scheme, folded_scheme_problems, pin_row_max, w4a16_weight,
)

__all__ = [
    "CT_METHOD", "DIVISIONS", "ExportReport", "InteropError", "check_cutlass_shapes", "compressed_tensors_config",
    "ct_scales_to_dpq", "dpq_config_from_compressed_tensors", "export_compressed_tensors", "export_group_scales",
    "fold_fixed_point", "fold_group_scales", "folded_channel_scale", "folded_effective_weight", "folded_scheme",
    "folded_scheme_problems", "import_compressed_tensors", "is_compressed_tensors_config", "pin_row_max",
    "read_compressed_tensors", "scheme_from_compressed_tensors", "w4a16_weight", "w4a8_fp8_args",
]
