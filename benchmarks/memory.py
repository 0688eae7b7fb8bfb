"""Resident weight memory of a loaded model, counted the same way for every quantization.

vLLM logs "Model loading took X GiB" on GPU only. This walks a module tree and sums every
distinct tensor storage it holds: parameters, buffers, and tensors kept as plain attributes
(backends such as ours keep their prepared weights in attributes, e.g. a bf16 cache of the
FP8 values), looking one level into tuples, lists, dicts and dataclasses. Storages shared by
several modules (tied embeddings) are counted once; KV-cache tensors that vLLM attaches to its
attention layers (attributes named `kv_cache`) are not weights and are left out. Weights that
vLLM moved into an opaque CPU kernel handle are counted from the layer's shape.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def _tensors(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3:
        if isinstance(value, (tuple, list)):
            items = value
        elif isinstance(value, dict):
            items = value.values()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = [getattr(value, f.name) for f in dataclasses.fields(value)]
        else:
            return
        for item in items:
            yield from _tensors(item, depth + 1)


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """{device type: bytes} of the distinct tensor storages the model holds."""
    seen: set[tuple[str, int]] = set()
    total: dict[str, int] = {}
    for mod in model.modules():
        for name, value in vars(mod).items():  # includes the _parameters and _buffers dicts
            if "kv_cache" in name:  # vLLM's attention layers hold their KV-cache blocks
                continue
            for t in _tensors(value):
                if t.is_meta:
                    continue
                storage = t.untyped_storage()
                key = (t.device.type, storage.data_ptr())
                if key in seen or storage.nbytes() == 0:
                    continue
                seen.add(key)
                total[t.device.type] = total.get(t.device.type, 0) + storage.nbytes()
        opaque = _opaque_cpu_weight_bytes(mod)
        if opaque:
            total["cpu"] = total.get("cpu", 0) + opaque
    return total


def _opaque_cpu_weight_bytes(mod: nn.Module) -> int:
    """vLLM on CPU hands unquantized Linear weights to a oneDNN / sgl kernel handle (a packed
    copy no tensor attribute shows) and empties the module's `weight`: count N x K x itemsize."""
    w = mod._parameters.get("weight")
    if w is None or w.numel() or not callable(getattr(mod, "cpu_linear", None)):
        return 0
    n, k = getattr(mod, "output_size_per_partition", None), getattr(mod, "input_size_per_partition", None)
    return int(n) * int(k) * w.element_size() if n and k else 0
