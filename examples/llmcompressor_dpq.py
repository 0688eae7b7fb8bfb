"""DPQ inside llm-compressor: calibrate with oneshot, save compressed-tensors W4A8-FP8.

Run in the llm-compressor venv (scripts/llmcompressor_env.sh), not the vLLM one:

    .venv-llmc/bin/python examples/llmcompressor_dpq.py MODEL_DIR OUT_DIR [--yaml]

then serve OUT_DIR from the vLLM venv: group 128 with stock vLLM on Hopper
(`vllm serve OUT_DIR --dtype bfloat16`), any group size with the plugin (`--quantization dpq`).
"""

import argparse
from pathlib import Path

from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from calibration.llmcompressor import DPQModifier  # importing it registers DPQModifier for YAML recipes

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("output")
p.add_argument("--text", default="examples/data/austen_sensesensibility.txt", help="calibration text")
p.add_argument("--yaml", action="store_true", help="use examples/llmcompressor_dpq_recipe.yaml")
p.add_argument("--samples", type=int, default=128)
p.add_argument("--seq-len", type=int, default=512)
a = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(a.model)
ids = tokenizer(Path(a.text).read_text())["input_ids"]
windows = [ids[i:i + a.seq_len] for i in range(0, len(ids) - a.seq_len, a.seq_len)][: a.samples]
ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})

recipe = (str(Path(__file__).with_name("llmcompressor_dpq_recipe.yaml")) if a.yaml else
          [DPQModifier(group_size=128, gar=True, ignore=["lm_head"])])
model = AutoModelForCausalLM.from_pretrained(a.model, dtype="bfloat16")
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows), max_seq_length=a.seq_len)
model.save_pretrained(a.output, save_compressed=True)  # llm-compressor's own save: pack-quantized
tokenizer.save_pretrained(a.output)
