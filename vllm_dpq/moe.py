"""Mixture-of-experts layers in the checkpoint's terms: one nn.Linear per expert projection.

transformers 5 holds a MoE layer's routed experts as fused 3-D parameters
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), while checkpoints on
disk, and vLLM's expert weight loader, name every expert's projections
(``mlp.experts.<e>.gate_proj.weight``; Mixtral: ``block_sparse_moe.experts.<e>.w1.weight``).
``unfuse_experts`` rebuilds a model's tree in the checkpoint's terms: each fused experts module
becomes ``Experts``, a list of ``ExpertMLP`` whose projections are nn.Linear under the stored
names, and a MoE block stored under another name than the model's attribute (Mixtral) takes the
stored name. Everything written for nn.Linear (calibration, the reference forward, the writer,
the shape checks) then handles experts, and state-dict names are checkpoint names.

Routers (``gate``) and shared-expert gates (``shared_expert_gate``) are never quantized.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoEFamily:
    gate: str = "gate_proj"  # names of an expert's projections in the checkpoint
    up: str = "up_proj"
    down: str = "down_proj"
    block: str | None = None  # the MoE block's stored name, where it differs from the model's


MOE_FAMILIES = {
    "qwen2_moe": MoEFamily(), "qwen3_moe": MoEFamily(), "olmoe": MoEFamily(), "deepseek_v3": MoEFamily(),
    "mixtral": MoEFamily("w1", "w3", "w2", block="block_sparse_moe"),
}
ROUTERS = ("gate", "shared_expert_gate")  # children of a MoE block that route: never quantized
_EXPERT = re.compile(r"\.experts\.\d+\.")


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x))."""

    def __init__(self, family: MoEFamily, hidden: int, inter: int, act_fn: nn.Module, device, dtype):
        super().__init__()
        self.names = (family.gate, family.up, family.down)
        for name, (n, k) in zip(self.names, ((inter, hidden), (inter, hidden), (hidden, inter))):
            self.add_module(name, nn.Linear(k, n, bias=False, device=device, dtype=dtype))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The routed experts of one MoE block, called as transformers' fused experts module is:
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    ``route_all`` (calibration): every expert also runs on every token, so its Linears see the
    whole calibration set; the output still sums the routed experts only."""

    route_all = False

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if self.route_all:
                y = expert(hidden)[token]
            elif token.numel():
                y = expert(hidden[token])
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _fused_experts(module: nn.Module) -> tuple[int, int, int] | None:
    """(E, H, I) if module is a fused experts module of the supported layout, else None."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or params["gate_up_proj"].ndim != 3:
        return None
    (e, i2, h), down = params["gate_up_proj"].shape, tuple(params["down_proj"].shape)
    if down != (e, h, i2 // 2) or i2 % 2:
        return None
    return e, h, i2 // 2


def _rename_child(parent: nn.Module, old: str, new: str) -> None:
    """The child is registered as ``new`` (state-dict names, named_modules) and stays reachable
    as ``parent.old`` (a plain attribute: the parent's forward still finds it)."""
    child = parent._modules[old]
    parent._modules = OrderedDict((new if k == old else k, v) for k, v in parent._modules.items())
    object.__setattr__(parent, old, child)


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every fused experts module of a supported MoE model (``MOE_FAMILIES``) by
    ``Experts`` (in place; a no-op for dense models and models already unfused). Parameters on
    the meta device stay there; real ones are copied into the per-expert Linears."""
    family = MOE_FAMILIES.get(getattr(model.config, "model_type", None))
    if family is None:
        return model
    for name, block in list(model.named_modules()):
        fused = getattr(block, "experts", None)
        dims = _fused_experts(fused) if isinstance(fused, nn.Module) and not isinstance(fused, Experts) else None
        if dims is None:
            continue
        e, h, inter = dims
        gate_up, down = fused.gate_up_proj, fused.down_proj
        experts = Experts(ExpertMLP(family, h, inter, fused.act_fn, gate_up.device, gate_up.dtype) for _ in range(e))
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for i, expert in enumerate(experts):
                    g, u, d = (getattr(expert, n) for n in expert.names)
                    g.weight.copy_(gate_up[i, :inter])
                    u.weight.copy_(gate_up[i, inter:])
                    d.weight.copy_(down[i])
        block.experts = experts
        parent_name, _, attr = name.rpartition(".")
        if family.block and attr != family.block:
            _rename_child(model.get_submodule(parent_name), attr, family.block)
    return model


def router_names(model: nn.Module) -> list[str]:
    """Full names of the routers and shared-expert gates of the model's MoE blocks."""
    return sorted(f"{name}.{r}" for name, block in model.named_modules() if isinstance(getattr(block, "experts", None),
                  Experts) for r in ROUTERS if isinstance(getattr(block, r, None), nn.Module))


def expert_siblings(name: str) -> str:
    """The name with its expert index replaced by ``*``: one key for a projection of every
    expert of a block (``...experts.3.up_proj`` -> ``...experts.*.up_proj``)."""
    return _EXPERT.sub(".experts.*.", name)


def moe_blocks(model: nn.Module) -> dict[str, Experts]:
    """Name of each unfused experts module -> the module."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
