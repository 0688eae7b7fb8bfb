"""Synthetic random Llama-style models (and Qwen3-MoE-style ones: ``Shape.experts``) on disk,
as Hugging Face writes them: bf16 safetensors
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, config.json and
a small BPE tokenizer trained on a text, so `vllm-dpq quantize` and transformers read the
folder like a downloaded model.

The weights are written tensor by tensor (vllm_dpq.shards.write_shards), so building a model
needs about one tensor of RAM, not the whole model. Linear and embedding weights are
N(0, 0.02) (Llama's initializer_range), norms are ones: random, but forward passes stay finite.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "synthetic_shape.json"  # written last: a folder without it is incomplete


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama-style decoder-only model (GQA, SwiGLU MLP, RMSNorm); with
    ``experts``, a Qwen3-MoE one: every MLP is that many SwiGLU experts of ``intermediate``
    each, top_k routed, and q/k norms."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 32000
    tied: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections have a bias
    experts: int = 0
    top_k: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, d, kv = self.hidden, self.head_dim, self.kv_heads * self.head_dim
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", (h,))]
        for name, rows in (("q", self.heads * d), ("k", kv), ("v", kv)):
            out.append((p + f"self_attn.{name}_proj.weight", (rows, h)))
            if self.qkv_bias:
                out.append((p + f"self_attn.{name}_proj.bias", (rows,)))
        if self.experts:
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
        out += [(p + "self_attn.o_proj.weight", (h, self.heads * d)),
                (p + "post_attention_layernorm.weight", (h,))]
        mlps = [f"mlp.experts.{e}." for e in range(self.experts)] if self.experts else ["mlp."]
        if self.experts:
            out.append((p + "mlp.gate.weight", (self.experts, h)))
        for m in mlps:
            out += [(p + m + "gate_proj.weight", (self.intermediate, h)),
                    (p + m + "up_proj.weight", (self.intermediate, h)),
                    (p + m + "down_proj.weight", (h, self.intermediate))]
        return out

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the checkpoint, in file order (embeddings, layers, norm, lm_head)."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += self.layer_tensors(i)
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def layer_params(self) -> int:
        """Parameters of one decoder layer (all layers are alike)."""
        return sum(_numel(s) for _, s in self.layer_tensors(0))

    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    def hf_config(self):
        from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

        d = {"hidden_size": self.hidden, "intermediate_size": self.intermediate,
             "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
             "num_hidden_layers": self.layers, "vocab_size": self.vocab, "tie_word_embeddings": self.tied,
             "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}
        if self.experts:
            config = Qwen3MoeConfig(**d, head_dim=self.head_dim, moe_intermediate_size=self.intermediate,
                                    num_experts=self.experts, num_experts_per_tok=self.top_k, norm_topk_prob=True)
            config.architectures = ["Qwen3MoeForCausalLM"]
        else:
            config = (Qwen2Config if self.qkv_bias else LlamaConfig)(**d)
            config.architectures = [("Qwen2" if self.qkv_bias else "Llama") + "ForCausalLM"]
        config.dtype = "bfloat16"
        return config


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def llama_width(hidden: int, layers: int, vocab: int = 32000) -> Shape:
    """A Llama-3-like shape of a given width: MLP 3.5x hidden (Llama-3-70B's ratio) rounded to 64,
    head_dim 128 (64 below hidden 1024), 4 query heads per KV head."""
    head_dim = 128 if hidden >= 1024 else 64
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}")
    heads = hidden // head_dim
    return Shape(hidden=hidden, intermediate=round(3.5 * hidden / 64) * 64, heads=heads,
                 kv_heads=max(1, heads // 4), layers=layers, vocab=vocab)


def write_tokenizer(folder: Path, text: str, vocab: int = 4096) -> None:
    """A byte-level BPE tokenizer trained on text (ids < vocab; <unk> <s> </s> = 0 1 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def build_model(folder: str | os.PathLike, shape: Shape, text_file: str | os.PathLike, seed: int = 0,
                max_shard_bytes: int = 1 << 30) -> Path:
    """Write a random model of `shape` to folder (reused if a complete one of the same shape is
    there), tensor by tensor into shards (vllm_dpq.shards), atomically: a killed build is
    never reused."""
    import torch

    from vllm_dpq.format import write_folder_atomically
    from vllm_dpq.shards import Entry, write_shards

    folder = Path(folder)
    want = {**asdict(shape), "seed": seed, "max_shard_bytes": max_shard_bytes}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    gen = torch.Generator().manual_seed(seed)

    def tensor(name: str, s: tuple[int, ...]) -> torch.Tensor:  # drawn in write order: deterministic
        if name.endswith("norm.weight"):
            return torch.ones(s, dtype=torch.bfloat16)
        return (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)

    def write(tmp: Path) -> None:
        write_shards(tmp, [Entry(n, torch.bfloat16, s, lambda n=n, s=s: tensor(n, s)) for n, s in shape.tensors()],
                     max_shard_bytes)
        shape.hf_config().save_pretrained(tmp)
        write_tokenizer(tmp, Path(text_file).read_text(encoding="utf-8")[:300_000])
        (tmp / MARKER).write_text(json.dumps(want))

    return write_folder_atomically(folder, True, write)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write a synthetic random model folder (see the module doc).")
    p.add_argument("folder")
    p.add_argument("--shape", required=True, help="the Shape fields as JSON")
    p.add_argument("--data", required=True, help="text to train the tokenizer on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    a = p.parse_args(argv)
    print(build_model(a.folder, Shape(**json.loads(a.shape)), a.data, a.seed, a.max_shard_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
