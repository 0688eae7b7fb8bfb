"""Every backend against the one reference (numerics.reference_linear), and the dispatch."""

import pytest
import torch

from vllm_dpq.kernels import BACKENDS, ENV_BACKEND, select_backend
from vllm_dpq.kernels.cpu import ENV_WEIGHTS
from vllm_dpq.numerics import FP8_DTYPE, Scheme, quantize_activation, reference_linear

from kernel_cases import close, make  # tests/kernel_cases.py, shared with the Triton tests

VARIANTS = [("cpu", "int4"), ("cpu", "fp8"), ("cpu", "bf16"), ("scaled_mm", "int4"), ("triton", "int4")]
assert {b for b, _ in VARIANTS} == set(BACKENDS), "every backend is tested against the reference"


@pytest.mark.parametrize("backend,cpu_weights", VARIANTS)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n,k,g", [(96, 576, 128), (40, 72, 32), (64, 1536, 64), (33, 100, -1)])
def test_backend_matches_reference(backend, cpu_weights, static, n, k, g, monkeypatch):
    monkeypatch.setenv(ENV_WEIGHTS, cpu_weights)
    scheme = Scheme(group_size=g, weight_scale="channel" if k == 100 else "tensor")
    qw, x, s_x, bias, weights = make(n, k, scheme, static)
    b = BACKENDS[backend]
    reason = b.unsupported(weights, torch.device("cpu"))
    if reason:  # triton: GPU only; on CPU it is covered by tests/test_triton_kernel.py (interpreter)
        pytest.skip(f"{backend} on CPU: {reason}")
    state = b.prepare(weights)
    for with_bias in (None, bias):
        y = b.apply(state, x, with_bias)
        ref = reference_linear(x, qw, scheme.fp8_max, s_x, with_bias)
        assert y.shape == (7, n) and y.dtype == torch.bfloat16
        assert close(y, ref, with_bias)
    # 3-D input
    y3 = b.apply(state, x.reshape(7, 1, k))
    assert y3.shape == (7, 1, n)


@pytest.mark.parametrize("static", [False, True])
def test_emulated_gemm_equals_scaled_mm(static):
    """bf16 GEMM over FP8-rounded operands == torch._scaled_mm, up to fp32 summation order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) * 3
    w8 = (torch.randn(48, 256, generator=g) * 30).to(FP8_DTYPE)
    s_in = torch.tensor([x.abs().max().item() / 448]) if static else None
    x8, s_x = quantize_activation(x, s_in)
    s_w = torch.rand(1, 48, generator=g) + 0.5
    emulated = (x8.to(torch.bfloat16).float() @ w8.to(torch.bfloat16).float().t()) * s_x * s_w
    scaled = torch._scaled_mm(x8.to(FP8_DTYPE), w8.t(), scale_a=s_x.expand(16, 1).contiguous(), scale_b=s_w,
                              out_dtype=torch.float32)
    # fp32 summation order (and where the scales are applied) differ: bound the difference by
    # fp32 rounding of the sum of |products|, which cancellation cannot shrink
    magnitude = (x8.abs() @ w8.float().abs().t()) * s_x * s_w
    assert ((scaled - emulated).abs() <= 256 * 2.0**-23 * magnitude + 1e-6).all()


def test_dispatch_picks_cpu_and_honours_override(monkeypatch):
    _, _, _, _, weights = make(16, 64, Scheme(group_size=32), False)
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert select_backend(weights, "cpu").name == "cpu"
    monkeypatch.setenv(ENV_BACKEND, "scaled_mm")
    assert select_backend(weights, "cpu").name == "scaled_mm"
    monkeypatch.setenv(ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(weights, "cpu")
    monkeypatch.delenv(ENV_BACKEND)
    with pytest.raises(RuntimeError, match="no DPQ backend"):
        select_backend(weights, "meta")


def test_cpu_weight_mode_validation(monkeypatch):
    monkeypatch.setenv(ENV_WEIGHTS, "fp4")
    _, _, _, _, weights = make(16, 64, Scheme(group_size=32), False)
    with pytest.raises(ValueError, match=ENV_WEIGHTS):
        BACKENDS["cpu"].prepare(weights)


def test_kernels_import_without_vllm():
    import subprocess
    import sys

    code = ("import sys; sys.modules['vllm'] = None\n"
            "import vllm_dpq, vllm_dpq.kernels, vllm_dpq.numerics, vllm_dpq.format, vllm_dpq.reference\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resident_bytes_counts_attributes_once():
    from dataclasses import dataclass

    from vllm_dpq.memory import resident_bytes

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
    from vllm_dpq.memory import resident_bytes

    lin = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)
    lin.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    lin.output_size_per_partition, lin.input_size_per_partition = 4, 8
    lin.cpu_linear = lambda x, weight, bias: x
    assert resident_bytes(lin) == {"cpu": 4 * 8 * 2}
