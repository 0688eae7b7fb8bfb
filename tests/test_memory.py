"""benchmarks/memory.py: resident weight memory as the benchmarks count it."""

import torch


def test_resident_bytes_counts_attributes_once():
    from dataclasses import dataclass

    from benchmarks.memory import resident_bytes

    @dataclass
    class State:
        cache: torch.Tensor
        scale: torch.Tensor

    lin = torch.nn.Linear(8, 4, bias=False)  # 32 fp32 = 128 B
    emb = torch.nn.Embedding(4, 8)
    emb.weight = lin.weight  # tied: counted once
    lin.register_buffer("buf", torch.zeros(3, dtype=torch.int32))  # 12 B
    lin._dpq_state = State(torch.zeros(4, 8, dtype=torch.bfloat16), torch.ones(1))  # 64 + 4 B
    lin.view = lin._dpq_state.cache[:2]  # a view of a counted storage: 0 B
    lin.kv_cache = [torch.zeros(1000)]  # vLLM's KV-cache blocks are not weights: 0 B
    model = torch.nn.Sequential(lin, emb)
    assert resident_bytes(model) == {"cpu": 128 + 12 + 64 + 4}


def test_resident_bytes_counts_weights_held_by_an_opaque_cpu_kernel():
    """vLLM-CPU's unquantized Linear: weight emptied, a packed copy behind `cpu_linear`."""
    from benchmarks.memory import resident_bytes

    lin = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)
    lin.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    lin.output_size_per_partition, lin.input_size_per_partition = 4, 8
    lin.cpu_linear = lambda x, weight, bias: x
    assert resident_bytes(lin) == {"cpu": 4 * 8 * 2}
