"""Shared fixtures: tiny random models (plumbing, not accuracy), checkpoints, the corpora."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpora"
BUNDLED = Path(__file__).resolve().parents[1] / "examples" / "data"


def corpus(name: str) -> Path:
    """A text from the shared corpora, else the copy bundled in examples/data (a fresh clone)."""
    for path in (CORPORA / name, BUNDLED / name):
        if path.exists():
            return path
    pytest.skip(f"corpus {name} not available")


def tiny_config(arch: str = "llama", **kw):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)
    common.update(kw)
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32).eval()


def make_checkpoint(out: Path, arch: str = "llama", method: str = "rtn", activations: str = "dynamic",
                    group_size: int = 32, samples: int = 8, **scheme_kw) -> tuple[Path, torch.nn.Module]:
    """Quantize a tiny random model with the real pipeline; returns (folder, BF16-source model)."""
    from calibration.algorithms import Recipe
    from calibration.pipeline import calibrate
    from calibration.writer import save_checkpoint
    from vllm_dpq.format import DPQConfig
    from vllm_dpq.numerics import Scheme

    source = tiny_model(arch)
    model = tiny_model(arch)
    scheme = Scheme(group_size=group_size, activation_scheme=activations, **scheme_kw)
    recipe = Recipe(method=method, scheme=scheme)
    ids = torch.randint(0, 512, (samples, 64), generator=torch.Generator().manual_seed(1))
    result = calibrate(model, ids, recipe, ["lm_head"], progress=False)
    save_checkpoint(out, model, None, result, DPQConfig(scheme, ["lm_head"], recipe.to_dict()), torch.float32)
    return out, source


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_tiny_model_dir(path: Path, arch: str = "llama", layers: int = 2, text: str | None = None,
                        dtype: torch.dtype = torch.float32, max_shard_size: str = "50GB", **config_kw) -> Path:
    """A tiny random model + a small BPE tokenizer trained here (its model_max_length the
    model's max_position_embeddings, as real checkpoints have), saved as a HF folder."""
    model = tiny_model(arch, num_hidden_layers=layers, **config_kw).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    save_tokenizer(path, text, model.config.max_position_embeddings)
    return path


def save_tokenizer(path: Path, text: str | None = None, model_max_length: int | None = None) -> None:
    """A small byte-level BPE tokenizer (512 tokens, <unk> <s> </s> = 0 1 2, no chat template)
    trained on text, saved to path; ``model_max_length`` in its tokenizer_config.json if given."""
    import json

    from benchmarks.synthetic_model import write_tokenizer

    write_tokenizer(path, text or "The quick brown fox jumps over the lazy dog. " * 50, vocab=512)
    if model_max_length:
        cfg = path / "tokenizer_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": model_max_length}, indent=2))


def fp8(x: torch.Tensor) -> torch.Tensor:
    """The FP8 step by hand: saturate to +-448, round to the nearest e4m3fn value (ties to even)."""
    return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_distributed(world_size: int = 1, rank: int = 0, port: int | None = None):
    """A gloo process group (tensor parallel over world_size ranks, this process being rank)
    and a current vLLM config, as vLLM's workers have: what vLLM's parallel layers need."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import cleanup_dist_env_and_memory, init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port or free_port()}")
        initialize_model_parallel(world_size, 1)
        try:
            yield
        finally:
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="module")
def tp1():
    """World size 1 (see vllm_distributed)."""
    with vllm_distributed():
        yield
