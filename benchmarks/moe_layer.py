"""One mixture-of-experts layer's routed experts on CPU: where the time goes at decode sizes.

The synthetic Qwen3-MoE of docs/RESULTS.md by default (hidden 512, intermediate 256, 8 experts,
top 2, group 32, dynamic activations), --tokens tokens routed by random logits (fixed seed).
Rows, timed per call in one process, interleaved call by call (other load on the machine hits
every row alike), each after writing --flush-mb MiB (untimed: weights from memory, as in a
model), median of --reps calls after warm-up:

  dpq_moe        the cpu kernel's fused op (kernels.cpu.CpuMoE: ops.moe), what DPQMoEMethod runs
  dpq_two_calls  the path it replaced: two grouped_linear calls and the torch ops around them
                 (argsort, bincount, gathers, silu * up, weighted fp32 index_add_, cast)
  dpq_w13        the gate_up grouped_linear call alone (on the grouped rows)
  dpq_w2         the down grouped_linear call alone
  vllm_bf16      vLLM-CPU's fused BF16 MoE op (cpu_fused_moe, weights prepacked as vLLM does;
                 AMX tiles where the CPU has them), where vLLM is importable

    PYTHONPATH=. python benchmarks/moe_layer.py [--tokens 32] [--threads 1 --clock cpu] [--reps 200]
        [--out results/moe_layer.json]

--clock cpu (with --threads 1) times each call by this thread's CPU time, which other processes
on a shared machine cannot inflate. Prints a table (us per call, and the time of vllm_bf16 over
each row's: its speed against BF16) and writes JSON with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.cpu_kernel import cpu_flags, layer, medians


def experts(n: int, k: int, count: int, group: int):
    """count experts' W4A8 weights [n, k], stacked as vLLM loads them, as one CpuExperts."""
    from vllm_dpq.kernels.cpu import CpuBackend, stack_experts

    made = [layer(n, k, group) for _ in range(count)]
    for e, w in enumerate(made):  # distinct experts: roll the codes
        w.packed = w.packed.roll(e, 0)
    packed = torch.stack([w.packed for w in made])
    group_scale = torch.stack([w.group_scale for w in made])
    states = []
    for e, w in enumerate(made):
        w.packed, w.group_scale = packed[e], group_scale[e]
        states.append(CpuBackend().prepare(w))
    return stack_experts(states, packed, group_scale)


def vllm_bf16_moe(x, topk_weights, topk_ids, count: int, hidden: int, inter: int):
    """vLLM-CPU's fused BF16 MoE call for random weights, or None without vLLM."""
    try:
        from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    except Exception:  # noqa: BLE001 - no vLLM here: the row is left out
        return None
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    g = torch.Generator().manual_seed(1)
    w13 = cpu_prepack_moe_weight((torch.randn(count, 2 * inter, hidden, generator=g) * 0.05).to(torch.bfloat16), isa)
    w2 = cpu_prepack_moe_weight((torch.randn(count, hidden, inter, generator=g) * 0.05).to(torch.bfloat16), isa)
    out = torch.empty_like(x)
    ids = topk_ids.to(torch.int32)
    return lambda: cpu_fused_moe(out, x, w13, w2, None, None, topk_weights, ids, "silu", isa, False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/moe_layer.json"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--flush-mb", type=int, default=64)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args(argv)
    from vllm_dpq.kernels.cpu import CpuMoE, request_amx

    request_amx()  # vLLM's AMX MoE kernel runs tiles without asking Linux first
    if args.threads:
        torch.set_num_threads(args.threads)
    h, inter, count, top_k = args.hidden, args.intermediate, args.experts, args.top_k
    w13, w2 = experts(2 * inter, h, count, args.group), experts(h, inter, count, args.group)
    if w13 is None:
        raise SystemExit("the CPU kernel cannot be built here (see the warning)")
    moe = CpuMoE(w13, w2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, h, generator=g).to(torch.bfloat16)
    topk_weights, topk_ids = torch.topk(torch.softmax(torch.randn(args.tokens, count, generator=g), -1), top_k)

    def two_calls():
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=count)
        tokens = order // top_k
        weights = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(x.shape[0], h, dtype=torch.float32)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        gate_up = w13.apply(x[tokens], offsets)
        y = w2.apply(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], offsets)
        return out.index_add_(0, tokens, y.float() * weights[:, None]).to(x.dtype)

    assert torch.equal(moe.apply(x, topk_weights, topk_ids), two_calls())
    order = torch.argsort(topk_ids.reshape(-1), stable=True)
    counts = torch.bincount(topk_ids.reshape(-1), minlength=count)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    xs = x[order // top_k]
    gate_up = w13.apply(xs, offsets)
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    calls = {"dpq_moe": lambda: moe.apply(x, topk_weights, topk_ids), "dpq_two_calls": two_calls,
             "dpq_w13": lambda: w13.apply(xs, offsets), "dpq_w2": lambda: w2.apply(act, offsets),
             "vllm_bf16": vllm_bf16_moe(x, topk_weights, topk_ids, count, h, inter)}
    calls = {r: c for r, c in calls.items() if c is not None}
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    flush = torch.zeros(args.flush_mb * 2**18) if args.flush_mb else None
    us = {r: t * 1e6 for r, t in medians(calls, args.reps, 10, clock, flush).items()}
    result = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
              "isa": torch.ops.vllm_dpq_cpu.isa(), "threads": torch.get_num_threads(), "clock": args.clock,
              "args": {k: str(v) for k, v in vars(args).items()}, "us": us}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.tokens} tokens, top {top_k} of {count} experts, hidden {h}, intermediate {inter}, group "
          f"{args.group}; kernel {result['isa']}, {result['threads']} threads, {args.clock} clock; "
          f"flags {' '.join(result['flags'])}")
    print(f"{'row':15s} {'us/call':>9s} {'bf16 time / row time':>21s}")
    for r, t in us.items():
        print(f"{r:15s} {t:9.1f} {us['vllm_bf16'] / t if 'vllm_bf16' in us else float('nan'):21.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
