"""Reference forward: a DPQ checkpoint run in plain PyTorch/transformers with exact numerics.

Ground truth for the vLLM plugin and the tool for accuracy evaluation without vLLM:

    model, tok = load_reference_model(ckpt)                 # W4A8, exact (DPQ spec section 1)
    model, tok = load_reference_model(ckpt, mode="w4a16")   # same codes, no FP8 rounding at all

Modes:
  w4a8   y = reference_linear(x): FP8 activations (static or dynamic per the checkpoint),
         weight fp8(q * s_g), fp32 accumulation, scales in fp32, out in the model dtype.
  w4a16  y = x @ (s_w * q * s_g)^T in fp32: the INT4 weight alone (a baseline row of the
         accuracy table, not a served format).

``activations="dynamic"`` ignores a static checkpoint's input scales (to compare both
activation schemes on one calibration); ``gemm_dtype=torch.bfloat16`` computes the GEMMs
as the CPU backend does (one extra bf16 rounding; ~3x faster for evaluation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vllm_dpq.format import Checkpoint, hf_model, read_checkpoint
from vllm_dpq.numerics import QuantizedWeight, expand_groups, w4a8_matmul

MODES = ("w4a8", "w4a16")


class ReferenceW4A8Linear(nn.Module):
    """nn.Linear replacement holding a quantized weight; exact W4A8 (or W4A16) numerics."""

    def __init__(self, qw: QuantizedWeight, fp8_max: float, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, mode: str = "w4a8", gemm_dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.fp8_max, self.gemm_dtype = mode, fp8_max, gemm_dtype
        self.out_features, self.in_features = qw.shape
        self.register_buffer("weight_scale", qw.weight_scale.float().reshape(-1), persistent=False)
        if mode == "w4a8":
            w = qw.fp8(fp8_max)  # B operand; s_w applied after the GEMM, like the hardware
        else:
            g = expand_groups(qw.group_scale.float(), self.in_features, qw.group_size)
            w = self.weight_scale.reshape(-1, 1) * qw.q.float() * g
        self.register_buffer("w", w.to(gemm_dtype), persistent=False)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "w4a8":
            return w4a8_matmul(x, self.w, self.weight_scale, self.fp8_max, self.input_scale, self.bias, x.dtype,
                               self.gemm_dtype)
        y = (x.to(self.gemm_dtype) @ self.w.t()).float()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def build_model(ckpt: Checkpoint, mode: str = "w4a8", dtype: torch.dtype = torch.float32,
                activations: str | None = None, gemm_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Instantiate the transformers model of a checkpoint with ReferenceW4A8Linear layers."""
    model = hf_model(ckpt.path, dtype)
    config = model.config
    scheme = ckpt.config.scheme
    for prefix, (n, k) in ckpt.layers.items():
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(f"checkpoint layer {prefix} does not exist in {config.model_type} model") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (n, k):
            raise ValueError(f"checkpoint layer {prefix} [{n}, {k}] does not match model module {old}")
        bias = ckpt.tensors.get(f"{prefix}.bias")
        s_x = None if activations == "dynamic" else ckpt.input_scale(prefix)
        _set_module(model, prefix, ReferenceW4A8Linear(ckpt.quantized(prefix), scheme.fp8_max, s_x, bias, mode,
                                                       gemm_dtype))
    state = {k: v for k, v in ckpt.unquantized_tensors().items() if not k.endswith(".bias") or
             k.rsplit(".", 1)[0] not in ckpt.layers}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint tensors not in the model: {unexpected[:5]}")
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {missing[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def load_reference_model(path: str | Path, mode: str = "w4a8", dtype: torch.dtype = torch.float32,
                         activations: str | None = None, gemm_dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a DPQ checkpoint folder; tokenizer is None if the folder has none."""
    from transformers import AutoTokenizer

    if activations not in (None, "static", "dynamic"):
        raise ValueError(f"activations must be 'static' or 'dynamic', got {activations!r}")
    ckpt = read_checkpoint(path)
    if activations == "static" and ckpt.config.scheme.activation_scheme != "static":
        raise ValueError(f"{path} has no static activation scales (calibrate with --activations static)")
    model = build_model(ckpt, mode, dtype, activations, gemm_dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model, tok
