"""DPQModifier in llm-compressor's multi-process calibration (docs/INTEROP.md), in the
llm-compressor venv (scripts/llmcompressor_env.sh):

    torchrun --standalone --nproc_per_node 2 examples/llmcompressor_dpq_torchrun.py MODEL_DIR OUT_DIR
    python examples/llmcompressor_dpq_torchrun.py MODEL_DIR OUT_DIR          # the same, one process

Each rank runs the model on its own share of the calibration windows; for every layer
llm-compressor sums the ranks' Hessians on the rank it assigns the layer to, that rank quantizes
it with DPQ, and every rank gets the result; every rank calls save_pretrained (collective:
the ranks compress their shares, rank 0 writes). NOT RELIABLE YET (docs/INTEROP.md): on CPU
with gloo, two ranks, most runs saved one k_proj or v_proj with all-zero codes; compare the
result with a one-process run before using it. Kept as the reproduction. Not run on GPUs here.
Two departures from llm-compressor 0.14's own multi-GPU recipe:
  - without an accelerator ``compressed_tensors.distributed.init_dist()`` fails
    (``torch.accelerator.current_accelerator()`` is None): the gloo process group is made here;
  - each rank is given its own windows: given the same dataset on every rank, llm-compressor
    0.14.0.1 partitions it but draws the partition's indices from the whole dataset
    (``datasets/utils.py: _make_sampler``), so every rank calibrates on the first
    1/world_size of the windows.
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from compressed_tensors.offload import load_offloaded_model
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibration.data import calibration_windows
from calibration.llmcompressor import DPQModifier

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("output")
p.add_argument("--text", default=str(Path(__file__).with_name("data") / "austen_sensesensibility.txt"))
p.add_argument("--samples", type=int, default=128)
p.add_argument("--seq-len", type=int, default=512)
p.add_argument("--group-size", type=int, default=128)
p.add_argument("--gar", action=argparse.BooleanOptionalAction, default=None, help="default: DPQ's (on)")
a = p.parse_args()

distributed = "RANK" in os.environ  # under torchrun
if distributed:
    if torch.accelerator.current_accelerator() is not None:
        from compressed_tensors.distributed import init_dist

        init_dist()  # nccl (CUDA) / xccl (XPU), one device per rank
    else:
        dist.init_process_group(backend="gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

tokenizer = AutoTokenizer.from_pretrained(a.model)
ids = calibration_windows(tokenizer, a.text, a.samples, a.seq_len, seed=0)  # the same windows on every rank
ids = ids[rank * len(ids) // world: (rank + 1) * len(ids) // world]  # this rank's share
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
with load_offloaded_model():  # rank 0 loads, the others share its weights
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map="auto_offload")
oneshot(model=model, dataset=ds, recipe=[DPQModifier(group_size=a.group_size, gar=a.gar, ignore=["lm_head"])],
        num_calibration_samples=len(ids), max_seq_length=a.seq_len, shuffle_calibration_samples=False)
model.save_pretrained(a.output, save_compressed=True)  # every rank: collective
if rank == 0:
    tokenizer.save_pretrained(a.output)
if distributed:
    dist.destroy_process_group()
