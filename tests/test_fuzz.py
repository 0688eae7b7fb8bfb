"""Checkpoint fuzzer: random corruptions of a valid checkpoint. Every case must end in a
CheckpointError that names what is wrong: no other exception, no crash, no hang, and never a
checkpoint that loads. DPQ_FUZZ_CASES sets the number of cases (default 240)."""

import json
import os
import random
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint
from vllm_dpq.format import MANIFEST, CheckpointError, file_digest, read_checkpoint

CASES = int(os.environ.get("DPQ_FUZZ_CASES", "240"))
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8]
BAD_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, -1e-3]


def tensor_mutation(rng, tensors, config, manifest):
    quant = sorted(k for k in tensors if k.rsplit(".", 1)[1] in ("weight_packed", "weight_group_scale",
                                                                  "weight_scale", "input_scale"))
    name = rng.choice(quant)
    t = tensors[name]
    kind = rng.choice(["delete", "dtype", "shape", "value", "orphan"])
    if kind == "delete":
        del tensors[name]
    elif kind == "dtype":
        tensors[name] = t.to(rng.choice([d for d in DTYPES if d != t.dtype]))
    elif kind == "shape":
        choice = rng.choice(["rows", "cols", "extra", "flat", "scalar"])
        if choice == "rows" and t.ndim == 2 and t.shape[0] > 1:
            tensors[name] = t[: rng.randrange(1, t.shape[0])].contiguous()
        elif choice == "cols" and t.ndim == 2 and t.shape[1] > 1:
            tensors[name] = t[:, : rng.randrange(1, t.shape[1])].contiguous()
        elif choice == "extra":
            tensors[name] = torch.cat([t, t[..., :1]], dim=-1).contiguous()
        elif choice == "flat" and t.ndim == 2:
            tensors[name] = t.flatten().contiguous()
        else:
            tensors[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]).contiguous()
    elif kind == "value" and not name.endswith("weight_packed"):
        flat = t.view(-1)
        flat[rng.randrange(flat.numel())] = rng.choice(BAD_VALUES + ([60.0] if name.endswith("group_scale") else [3.0]))
    elif kind == "value":  # packed codes: every int32 is a valid set of codes -> delete instead
        del tensors[name]
    else:  # a quantized tensor of a layer that is not in the manifest
        tensors["model.layers.9.mlp.up_proj.weight_scale"] = torch.ones(1)
    return f"{kind} {name}"


def config_mutation(rng, tensors, config, manifest):
    q = config["quantization_config"]
    key, value = rng.choice([
        ("format_version", rng.choice([0, 2, 99, "1", None, 1.5])),
        ("group_size", rng.choice([0, -2, 16, 64, 128, "32", None])),
        ("fp8_max", rng.choice([0, -448, 1e9, float("nan"), "x"])),
        ("weight_scale", rng.choice(["channel", "row", 1])),
        ("group_scale_dtype", rng.choice(["float16", "float8_e4m3fn", "int4"])),
        ("activation_scheme", rng.choice(["dynamic", "per_token", None])),
        ("quant_method", rng.choice(["gptq", "awq", "", None])),
        ("weight_bits", rng.choice([8, 3, "4"])),
        ("ignore", rng.choice(["lm_head", 3, [1, 2]])),
    ])
    if value is None:
        q.pop(key, None)
    else:
        q[key] = value
    manifest["scheme"] = {k: q.get(k) for k in manifest["scheme"]}  # stay in step: test the deep checks
    return f"config {key}={value!r}"


def manifest_mutation(rng, tensors, config, manifest):
    layers = manifest["layers"]
    name = rng.choice(sorted(layers))
    kind = rng.choice(["drop", "shape", "garbage", "version"])
    if kind == "drop":
        del layers[name]
    elif kind == "shape":
        n, k = layers[name]["shape"]
        layers[name]["shape"] = rng.choice([[n, k + 8], [n + 1, k], [k, n + 2], [n], [-n, k], ["a", k]])
    elif kind == "garbage":
        layers[name] = rng.choice([None, 3, "x", {"shape": None}])
    else:
        manifest["format_version"] = rng.choice([None, 7, "1"])
    return f"manifest {kind} {name}"


def file_mutation(rng, folder):
    """Raw damage to the tensor file, manifest hashes left as they were."""
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    kind = rng.choice(["flip", "truncate", "append", "zero-header"])
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "append":
        data += b"\0" * rng.randrange(1, 64)
    else:
        data[:8] = b"\0" * 8
    f.write_bytes(bytes(data))
    return f"file {kind}"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("fz") / "ck", activations="static")
    read_checkpoint(path)  # the source itself is valid
    return path


def _timeout(*_):
    raise TimeoutError("checkpoint validation hung")


def test_fuzz_checkpoints(valid, tmp_path):
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    signal.signal(signal.SIGALRM, _timeout)
    for i in range(CASES):
        case = tmp_path / f"case{i}"
        shutil.copytree(valid, case)
        family = rng.choice(["tensor", "config", "manifest", "file"])
        if family == "file":
            what = file_mutation(rng, case)
        else:
            tensors = load_file(str(case / "model.safetensors"))
            config = json.loads((case / "config.json").read_text())
            manifest = json.loads((case / MANIFEST).read_text())
            what = {"tensor": tensor_mutation, "config": config_mutation, "manifest": manifest_mutation}[family](
                rng, tensors, config, manifest)
            save_file(tensors, str(case / "model.safetensors"))
            f = case / "model.safetensors"
            manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)}}
            (case / "config.json").write_text(json.dumps(config))
            (case / MANIFEST).write_text(json.dumps(manifest))
        signal.alarm(20)
        try:
            read_checkpoint(case)
        except CheckpointError as e:
            assert str(e), what
            outcomes[family] = outcomes.get(family, 0) + 1
        else:
            pytest.fail(f"case {i} ({what}) loaded: a corrupted checkpoint must be refused")
        finally:
            signal.alarm(0)
        shutil.rmtree(case)
    print(f"\nfuzz: {CASES} corrupted checkpoints, all refused with CheckpointError: {outcomes}")
    assert sum(outcomes.values()) == CASES
