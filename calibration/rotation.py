"""Rotations fused offline into the weights (QuaRot / SpinQuant's R1 and R2, docs/ALGORITHMS.md):
a new Hugging Face folder computing the same function as the source, whose Linear weights have
their outliers spread across channels, so that INT4 groups quantize them with less error. Nothing
runs online: vLLM serves the rotated checkpoint as a plain model of its type.

R1 (the residual stream, hidden size d, orthogonal Q): every RMSNorm's weight is folded into the
Linears it feeds and becomes 1 (RMS is invariant under Q), then
    embed_tokens  E -> E Q            q/k/v, gate/up, lm_head  W -> W Q (their inputs)
    o_proj, down_proj  W -> Q^T W, bias b -> Q^T b (their outputs)
so every hidden state h becomes h Q and every Linear's output is unchanged. A tied lm_head is
untied (it is (E diag(norm)) Q, no longer the embedding): vocab x d more bytes are stored.
R2 (per attention head, head_dim, orthogonal H): each KV head's value rows W_v -> H^T W_v (bias
too), each head's columns of o_proj W_o -> W_o H; attention mixes value rows, so o_proj's input
is unchanged.

Q and H are randomized Hadamard matrices (Sylvester, or Paley's order 12 times Sylvester:
576 = 12 * 12 * 4, 1536 = 12 * 128) with random signs, else random orthogonal (QR of a Gaussian),
seeded. Only families whose blocks are pre-norm with RMSNorm rotate: a norm applied to a block's
output before the residual add (Gemma 2/3, OLMo2) or a LayerNorm that subtracts the mean (OLMo)
does not commute with Q.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from calibration import CalibrationError
from vllm_dpq.shards import Entry, TensorFiles, write_shards

ROTATIONS = ("none", "r1", "r1r2")
ROTATABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite")
INPUT_LINEARS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
OUTPUT_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _paley12() -> torch.Tensor:
    """Paley's construction I for q = 11: a Hadamard matrix of order 12."""
    q = 11
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n matrix of +-1 with orthogonal rows, for n = 12^b * 2^a (b <= 2); else None."""
    for b in range(3):
        m = n // 12**b
        if n % 12**b == 0 and m & (m - 1) == 0:
            core = torch.ones(1, 1, dtype=torch.float64)
            for _ in range(b):
                core = torch.kron(core, _paley12())
            return torch.kron(core, _sylvester(m))
    return None


def random_rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(an n x n orthogonal matrix in float64, "hadamard" or "orthogonal")."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return signs[:, None] * h / n ** 0.5, "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "orthogonal"


class Rotation:
    """The tensor-by-tensor rewrite of one checkpoint (see the module docstring)."""

    def __init__(self, files: TensorFiles, config: dict, kind: str, seed: int):
        model_type = config.get("model_type")
        if model_type not in ROTATABLE_TYPES:
            raise CalibrationError(
                f"--rotate: model_type {model_type!r} cannot be rotated (supported: {', '.join(ROTATABLE_TYPES)}): "
                "a rotation of the residual stream is exact only where every block is pre-norm with RMSNorm; "
                "norms on a block's output (Gemma 2/3, OLMo2) or mean-subtracting LayerNorms (OLMo) break it")
        self.files = files
        self.d = config["hidden_size"]
        self.head_dim = config.get("head_dim") or self.d // config["num_attention_heads"]
        self.q, self.matrix = random_rotation(self.d, seed)
        self.q = self.q.float()
        self.h = random_rotation(self.head_dim, seed + 1)[0].float() if kind == "r1r2" else None
        self.tied = "lm_head.weight" not in files
        if not self.tied and config.get("tie_word_embeddings"):
            raise CalibrationError("--rotate: the config ties the embeddings but the checkpoint stores lm_head.weight")
        self.rules: dict[str, Callable[[], torch.Tensor]] = {}
        self._plan()

    def _norm(self, name: str) -> torch.Tensor:
        return self.files[name].float()

    def _plan(self) -> None:
        for name in self.files:
            m = _LAYER.fullmatch(name)
            if name == "model.embed_tokens.weight":
                self.rules[name] = lambda n=name: self.files[n].float() @ self.q
            elif name == "model.norm.weight" or (m and m[2].removesuffix(".weight") in INPUT_LINEARS):
                self.rules[name] = lambda n=name: torch.ones_like(self.files[n], dtype=torch.float32)
            elif m and m[2].rsplit(".", 1)[0] in OUTPUT_LINEARS:
                self.rules[name] = lambda n=name, o=m[2].startswith("self_attn"): self._output(n, o)
            elif m and any(m[2].rsplit(".", 1)[0] in lins for lins in INPUT_LINEARS.values()):
                self.rules[name] = lambda n=name, i=m[1], sub=m[2]: self._input(n, i, sub)
            elif self.d in self.files.info[name].shape and name != "lm_head.weight":
                raise CalibrationError(f"--rotate: checkpoint tensor {name} has the hidden size in its shape and no "
                                       "rotation rule (a module this family does not have)")
        source = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        self.rules["lm_head.weight"] = lambda: (self.files[source].float() * self._norm("model.norm.weight")) @ self.q

    def _input(self, name: str, layer: str, sub: str) -> torch.Tensor:
        t = self.files[name].float()
        module, leaf = sub.rsplit(".", 1)
        if leaf == "weight":
            norm = next(n for n, lins in INPUT_LINEARS.items() if module in lins)
            t = (t * self._norm(f"model.layers.{layer}.{norm}.weight")) @ self.q
        if module == "self_attn.v_proj" and self.h is not None:  # rows of each KV head: H^T W (bias alike)
            t = (self.h.t() @ t.reshape(-1, self.head_dim, t[0].numel())).reshape(t.shape)
        return t

    def _output(self, name: str, attention: bool) -> torch.Tensor:
        t = self.q.t() @ self.files[name].float().reshape(self.d, -1)
        if attention and self.h is not None and name.endswith(".weight"):  # each head's columns: W_o H
            t = (t.reshape(self.d, -1, self.head_dim) @ self.h).reshape(self.d, -1)
        return t.reshape(self.files.info[name].shape)

    def entries(self) -> list[Entry]:
        out = []
        for name, rule in self.rules.items():
            info = self.files.info.get(name) or self.files.info["model.embed_tokens.weight"]
            out.append(Entry(name, info.dtype, info.shape, lambda r=rule, dt=info.dtype: r().to(dt)))
        out += [Entry(name, info.dtype, info.shape, lambda n=name: self.files[n])
                for name, info in self.files.info.items() if name not in self.rules]
        return out


def rotated_dir_for(output: str | Path) -> Path:
    """Where `vllm-dpq quantize --rotate` writes the rotated source (beside OUTPUT, removed once
    the checkpoint is written; the resume work folder is its own)."""
    out = Path(output)
    return out.parent / f".{out.name}.dpq-rotated"


def rotate_checkpoint(src: str | Path, dst: str | Path, kind: str = "r1r2", seed: int = 0,
                      progress: bool = False) -> dict:
    """Write src's model rotated (kind "r1" or "r1r2") to the folder dst (replaced), one tensor at
    a time, with src's configs and tokenizer files; the config unties the embeddings. Returns
    what was done: {"rotation", "matrix", "seed", "seconds", "untied_bytes"}."""
    if kind not in ROTATIONS[1:]:
        raise ValueError(f"rotation must be one of {ROTATIONS[1:]}, got {kind!r}")
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    config = json.loads((src / "config.json").read_text())
    rotation = Rotation(TensorFiles(src), config, kind, seed)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, generation config, chat template: as they are
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    entries = rotation.entries()
    with tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc=f"rotating ({kind})",
              disable=not progress) as bar:
        write_shards(dst, entries, progress=lambda e: bar.update(e.nbytes))
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2) + "\n")
    untied = rotation.files.info["model.embed_tokens.weight"].nbytes if rotation.tied else 0
    return {"rotation": kind, "matrix": rotation.matrix, "seed": seed, "seconds": time.perf_counter() - t0,
            "untied_bytes": untied}
