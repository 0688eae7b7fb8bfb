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


@pytest.mark.parametrize("gemm", ["bfloat16", "float32"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_cpu_backend_gemm_dtypes(gemm, x_dtype, static, monkeypatch):
    """Both GEMM dtypes the CPU backend can choose, with bf16 and fp32 activations: fp32 is the
    reference's own computation (bit-identical), bf16 within one bf16 ulp."""
    from vllm_dpq.kernels.cpu import ENV_GEMM

    monkeypatch.setenv(ENV_GEMM, gemm)
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    scheme = Scheme(group_size=32)
    qw, x, s_x, bias, weights = make(48, 160, scheme, static, dtype=x_dtype)
    state = BACKENDS["cpu"].prepare(weights)
    assert state.gemm_dtype == getattr(torch, gemm)
    y = BACKENDS["cpu"].apply(state, x, bias)
    ref = reference_linear(x, qw, scheme.fp8_max, s_x, bias, out_dtype=x_dtype)
    assert y.dtype == x_dtype
    assert torch.equal(y, ref) if gemm == "float32" else close(y, ref, bias)


def test_cpu_gemm_dtype_follows_the_cpu(monkeypatch):
    from vllm_dpq.kernels import cpu

    monkeypatch.delenv(cpu.ENV_GEMM, raising=False)
    for bf16, amx, want in ((True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu.gemm_dtype() == want
    monkeypatch.setenv(cpu.ENV_GEMM, "fp16")
    with pytest.raises(ValueError, match=cpu.ENV_GEMM):
        cpu.gemm_dtype()


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


@pytest.mark.parametrize("field,bad,words", [
    ("packed", torch.zeros(16, 7, dtype=torch.int32), "packed weight must be int32"),
    ("group_scale", torch.ones(16, 3, dtype=torch.bfloat16), "group scales must be"),
    ("group_scale", torch.ones(16, 2, dtype=torch.float16), "group scales must be one of"),
    ("weight_scale", torch.ones(3), "weight scale must have"),
    ("group_size", 0, "group size must be positive"),
])
def test_every_backend_gets_a_checked_layout(field, bad, words):
    """select_backend checks the layout once, whatever backend is chosen or forced."""
    from dataclasses import replace

    _, _, _, _, weights = make(16, 64, Scheme(group_size=32), False)
    for forced in (None, "cpu", "scaled_mm"):
        with pytest.raises(ValueError, match=words):
            select_backend(replace(weights, **{field: bad}), "cpu", override=forced)
