"""Offline calibration: a Hugging Face causal LM in, a DPQ checkpoint out (`vllm-dpq quantize`)."""


class CalibrationError(ValueError):
    """Bad calibration input (data, model, settings): reported to the user without a traceback."""
