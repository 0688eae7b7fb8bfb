"""Every backend against the one reference (numerics.reference_linear), and the dispatch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vllm_dpq.kernels import BACKENDS, ENV_BACKEND, cpu, select_backend
from vllm_dpq.kernels.base import W4A8Weights
from vllm_dpq.numerics import FP8_DTYPE, Scheme, quantize_activation, reference_linear, w4a8_matmul
from vllm_dpq.packing import pack_int4

# tests/kernel_cases.py, shared with the Triton tests
from kernel_cases import (ACT_STATIC_SCALES, SCALE_DTYPES, activation_input, activation_mismatch, close, make,
                          synthetic_weights, tile_mismatches)

# the cpu backend's two GEMMs: vector (every M without AMX-BF16) and AMX tiles (from AMX_MIN_M
# rows on a CPU with AMX-BF16); each forced here for every M
VARIANTS = [("cpu", "kernel"), ("cpu", "amx"), ("scaled_mm", None), ("triton", None)]
assert {b for b, _ in VARIANTS} == set(BACKENDS), "every backend is tested against the reference"


def cpu_path(monkeypatch, path):
    """The kernel's vector GEMM at every M, or (path "amx") its AMX-tile GEMM at every M: skipped
    where the CPU, $DPQ_CPU_ISA or the kernel ISA under test has no AMX-BF16."""
    if path == "amx" and not cpu.amx_gemm():
        pytest.skip("no AMX-BF16 tiles here (the CPU, its Linux, $DPQ_CPU_ISA or the kernel ISA under test)")
    monkeypatch.setattr(cpu, "AMX_MIN_M", 1 if path == "amx" else 0)


def isa_gemm(isa_name):
    """The GEMM dtype a kernel ISA computes: bf16 dot products with AVX512-BF16, else fp32."""
    return "bfloat16" if isa_name == "avx512bf16" else "float32"


@pytest.fixture(params=list(reversed(cpu.ISAS)))
def isa(request):
    """Each kernel ISA this CPU runs (the AVX2 code runs on AVX-512 CPUs too), within $DPQ_CPU_ISA."""
    ops = cpu.kernels()
    if ops is None:
        pytest.skip("the CPU kernel cannot be built here (see the warning)")
    cap = cpu.isa_cap()
    if cap is not None and cpu.ISAS.index(request.param) > cpu.ISAS.index(cap):
        pytest.skip(f"{cpu.ENV_ISA}={cap}: runs as a CPU without {request.param}")
    try:
        before = ops.use_isa(request.param)
    except RuntimeError as e:
        pytest.skip(str(e))
    yield ops
    ops.use_isa(before)


@pytest.mark.parametrize("backend,path", VARIANTS)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n,k,g", [(96, 576, 128), (40, 72, 32), (64, 1536, 64), (33, 100, -1), (24, 200, 24)])
def test_backend_matches_reference(backend, path, static, n, k, g, monkeypatch):
    cpu_path(monkeypatch, path)
    ops = cpu.kernels()  # the GEMM this CPU's kernel computes: pretending AMX must not ask an
    monkeypatch.setenv(cpu.ENV_GEMM, isa_gemm(ops.isa() if ops is not None else "none"))  # AVX2 CPU for bf16
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
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("path", ["kernel", "amx"])
@pytest.mark.parametrize("n,k,g", [(48, 160, 32), (17, 101, -1), (40, 72, 24), (70, 192, 96)])
def test_cpu_backend_gemm_dtypes(gemm, x_dtype, static, path, n, k, g, isa, monkeypatch):
    """Both GEMM dtypes the CPU backend can choose, bf16/fp16/fp32 activations, both GEMMs, every
    ISA; N not a multiple of the tile, odd K (bf16 pairs), groups that are not whole chunks (24:
    fp32 GEMM, the AMX one needs whole 32-column chunks). Each sums in fp32 in its own order: within
    one bf16 ulp of the fp32 reference and, in fp32, within fp32 summation error of it (bounded by
    the sum of |products|). A bf16 GEMM on an ISA without bf16 dot products is refused at load."""
    monkeypatch.setenv(cpu.ENV_GEMM, gemm)
    cpu_path(monkeypatch, path)
    scheme = Scheme(group_size=g)
    qw, x, s_x, bias, weights = make(n, k, scheme, static, m=29, dtype=x_dtype)
    if gemm == "bfloat16" and isa.isa() != "avx512bf16":
        with pytest.raises(ValueError, match=cpu.ENV_GEMM):
            BACKENDS["cpu"].prepare(weights)
        return
    state = BACKENDS["cpu"].prepare(weights)
    assert state.gemm_dtype == getattr(torch, gemm)
    assert state.amx_min_m == (1 if path == "amx" and gemm == "bfloat16" else 0)
    y = BACKENDS["cpu"].apply(state, x, bias)
    assert y.dtype == x_dtype
    ref = reference_linear(x, qw, scheme.fp8_max, s_x, bias, out_dtype=x_dtype)
    assert close(y, ref, bias)
    if x_dtype == torch.float32:
        x8, s = quantize_activation(x, s_x)
        w8 = weights.fp8_values()
        magnitude = (x8.abs() @ w8.abs().t()) * s * weights.weight_scale
        assert ((y - ref).abs() <= k * 2.0**-23 * magnitude + 1e-6).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["kernel", "amx"])
def test_cpu_kernel_is_batch_invariant(x_dtype, path, isa, monkeypatch):
    """A row's output is the same bits whatever rows it is computed with (alone, in a batch of
    any size, at any position, on any number of threads): each output is summed over K in one
    order, by the vector GEMM and by the AMX one (each forced at every M here; the backend
    switches from one to the other at AMX_MIN_M rows). This is what keeps a request's greedy
    tokens independent of the batch it joins."""
    monkeypatch.setenv(cpu.ENV_GEMM, isa_gemm(isa.isa()))
    cpu_path(monkeypatch, path)
    _, x, _, bias, weights = make(100, 600, Scheme(group_size=32), False, m=300, dtype=x_dtype)
    state = BACKENDS["cpu"].prepare(weights)
    full = BACKENDS["cpu"].apply(state, x, bias)
    for rows in (slice(5, 6), slice(0, 1), slice(3, 17), slice(250, 300), slice(0, 299)):
        assert torch.equal(BACKENDS["cpu"].apply(state, x[rows], bias), full[rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(BACKENDS["cpu"].apply(state, x, bias), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("sdt", SCALE_DTYPES)
@pytest.mark.parametrize("n,k,g", [(24, 72, 32), (40, 100, 64), (40, 256, 128), (24, 100, -1), (16, 200, 64),
                                   (24, 96, 96), (17, 13, 4), (8, 40, 24)])
def test_cpu_kernel_dequantize_is_exact(sdt, n, k, g, isa):
    """The kernel's FP8 weight values equal W4A8Weights.fp8_values() byte for byte (saturating,
    subnormal and tie-rounding group scales; groups that are and are not multiples of the
    vector width; ragged last groups; per channel)."""
    w = synthetic_weights(n, k, g, getattr(torch, sdt))
    for dtype in (torch.float32, torch.bfloat16):
        w8 = isa.dequantize(w.packed, w.group_scale, w.k, w.group_size, w.fp8_max, dtype)
        assert w8.dtype == dtype and tile_mismatches(w8.float().to(FP8_DTYPE), w) == 0


@pytest.mark.parametrize("sdt", SCALE_DTYPES)
def test_cpu_kernel_chain_values_of_every_scale(sdt, isa):
    """The kernel's chain values (a table indexed by the scale's bits) equal fp8_values() for
    every finite positive group scale of the storage dtype and every code."""
    dtype = getattr(torch, sdt)
    bits = torch.arange(1, 0x7F80 if dtype == torch.bfloat16 else 0x7F, dtype=torch.int32)
    scales = (bits.to(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16
              else bits.to(torch.uint8).view(torch.float8_e4m3fn))
    n, k, group = 128, 32 * (-(-scales.numel() // 128)), 32
    s = torch.ones(n * k // group, dtype=torch.float32)
    s[: scales.numel()] = scales.float()
    q = (torch.arange(n * k) % 16 - 8).to(torch.int8).reshape(n, k)
    w = W4A8Weights(pack_int4(q), s.reshape(n, -1).to(dtype), torch.tensor([1.0]), None, k, group, 448.0)
    for out in (torch.float32, torch.bfloat16):
        assert tile_mismatches(isa.dequantize(w.packed, w.group_scale, k, group, 448.0, out).float().to(FP8_DTYPE), w) == 0


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(6, 300), (1, 576), (5, 17)])
def test_cpu_kernel_quantizes_activations_exactly(x_dtype, m, k, isa):
    """One-pass activation quantization == numerics.quantize_activation, bit for bit (values over
    2**-20..2**10, a zero row, e4m3 subnormals; dynamic and static scales, saturating ones)."""
    x = activation_input(m, k, x_dtype, torch.Generator().manual_seed(m * k))
    for scale in ACT_STATIC_SCALES:
        s = None if scale is None else torch.tensor([scale])
        x8, s_x = isa.quantize(x, s, 448.0)
        assert activation_mismatch(x8.to(FP8_DTYPE), s_x.reshape(-1), x, s, 448.0) is None



@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("path", ["kernel", "amx"])
@pytest.mark.parametrize("n,k,g", [(40, 72, 24), (48, 160, 32), (17, 101, -1)])
def test_cpu_grouped_linear_equals_each_experts_call(n, k, g, path, static, x_dtype, isa, monkeypatch):
    """A MoE projection's experts in one grouped kernel call (cpu.CpuExperts, rows grouped by
    expert, experts without rows among them, one with enough rows for the AVX2 GEMM's outer form
    and its chain-ordered activations) give every row the bits of its own expert's
    CpuBackend.apply, which the tests above hold against the reference (each GEMM forced)."""
    monkeypatch.setenv(cpu.ENV_GEMM, isa_gemm(isa.isa()))
    cpu_path(monkeypatch, path)
    counts = [3, 0, 70, 1, 6, 0]
    made = [make(n, k, Scheme(group_size=g, weight_scale="channel" if g == -1 else "tensor"), static, seed=e,
                  m=max(c, 1), dtype=x_dtype) for e, c in enumerate(counts)]
    packed = torch.stack([w.packed for *_, w in made])
    group_scale = torch.stack([w.group_scale for *_, w in made])
    states = []
    for e, (*_, w) in enumerate(made):
        w.packed, w.group_scale = packed[e], group_scale[e]  # views of the stacked tensors, as vLLM loads them
        states.append(BACKENDS["cpu"].prepare(w))
    experts = cpu.stack_experts(states, packed, group_scale)
    x = torch.cat([x[:c] for (_, x, *_), c in zip(made, counts)])
    offsets = torch.tensor([0, *itertools.accumulate(counts)])
    y = experts.apply(x, offsets)
    assert y.dtype == x_dtype and y.shape == (sum(counts), n)
    for e, (state, c) in enumerate(zip(states, counts)):
        rows = slice(offsets[e], offsets[e + 1])
        assert torch.equal(y[rows], BACKENDS["cpu"].apply(state, x[rows])), e
    with pytest.raises(RuntimeError, match="offsets"):
        experts.apply(x, offsets.flip(0))
    with pytest.raises(ValueError, match="packed"):
        cpu.stack_experts(states[::-1], packed, group_scale)

@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("path", ["kernel", "amx"])
@pytest.mark.parametrize("g,top_k", [(32, 2), (-1, 3)])
def test_cpu_moe_equals_the_per_expert_computation(g, top_k, path, static, x_dtype, isa, monkeypatch):
    """A MoE layer's routed experts in one kernel call (cpu.CpuMoE) give the bits of the
    per-expert computation of vllm_dpq.plugin.moe_method (each expert's rows through its own
    CpuBackend.apply, silu(gate) * up, weighted fp32 index_add_ over the rows grouped by expert);
    random routing with experts without tokens; a token's output does not depend on the batch."""
    monkeypatch.setenv(cpu.ENV_GEMM, isa_gemm(isa.isa()))
    cpu_path(monkeypatch, path)
    experts, h, inter, tokens = 6, 96, 64, 11
    scheme = Scheme(group_size=g, weight_scale="channel" if g == -1 else "tensor")
    projections = []
    for n, k, seed in ((2 * inter, h, 0), (h, inter, 100)):
        made = [make(n, k, scheme, static, seed=seed + e, dtype=x_dtype)[-1] for e in range(experts)]
        packed, group_scale = torch.stack([w.packed for w in made]), torch.stack([w.group_scale for w in made])
        states = []
        for e, w in enumerate(made):
            w.packed, w.group_scale = packed[e], group_scale[e]
            states.append(BACKENDS["cpu"].prepare(w))
        projections.append((states, cpu.stack_experts(states, packed, group_scale)))
    (s13, w13), (s2, w2) = projections
    moe = cpu.CpuMoE(w13, w2)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(tokens, h, generator=gen) * 2).to(x_dtype)
    ids = torch.stack([torch.randperm(experts - 2, generator=gen)[:top_k] for _ in range(tokens)])  # 4, 5: none
    ids[:7, 0] = 1  # expert 1: 7+ rows
    weights = torch.rand(tokens, top_k, generator=gen)
    y = moe.apply(x, weights, ids)
    order = torch.argsort(ids.reshape(-1), stable=True)
    counts, rows = torch.bincount(ids.reshape(-1), minlength=experts).tolist(), order // top_k
    ref, start = torch.zeros(tokens, h), 0
    for e, count in enumerate(counts):
        r = rows[start:start + count]
        gate_up = BACKENDS["cpu"].apply(s13[e], x[r])
        out = BACKENDS["cpu"].apply(s2[e], F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        ref.index_add_(0, r, out.float() * weights.reshape(-1)[order[start:start + count], None])
        start += count
    assert y.dtype == x_dtype and torch.equal(y, ref.to(x_dtype))
    for t in (0, 9):
        assert torch.equal(moe.apply(x[t:t + 1], weights[t:t + 1], ids[t:t + 1]), y[t:t + 1])
    with pytest.raises(RuntimeError, match="out of range"):
        moe.apply(x, weights, ids + experts)


def test_cpu_backend_without_its_kernel(monkeypatch):
    """Where the kernel cannot be built the backend computes the same numerics with torch ops."""
    monkeypatch.setattr(cpu, "kernels", lambda: None)
    monkeypatch.setenv(cpu.ENV_GEMM, "float32")
    scheme = Scheme(group_size=32)
    qw, x, s_x, bias, weights = make(48, 160, scheme, False)
    state = BACKENDS["cpu"].prepare(weights)
    assert torch.equal(BACKENDS["cpu"].apply(state, x, bias), reference_linear(x, qw, scheme.fp8_max, s_x, bias))


def test_cpu_gemm_dtype_follows_the_cpu(monkeypatch):
    """bf16 where the CPU has AVX512-BF16 or AMX, fp32 elsewhere; $DPQ_CPU_ISA chooses as a CPU
    with at most that ISA would (avx2 and avx512: fp32 and no AMX; avx512bf16: no AMX)."""
    monkeypatch.delenv(cpu.ENV_GEMM, raising=False)
    for cap, bf16, amx, want in ((None, True, False, torch.bfloat16), (None, False, True, torch.bfloat16),
                                 (None, False, False, torch.float32), ("avx2", True, True, torch.float32),
                                 ("avx512", True, True, torch.float32), ("avx512bf16", True, True, torch.bfloat16),
                                 ("avx512bf16", False, False, torch.float32)):
        if cap is None:
            monkeypatch.delenv(cpu.ENV_ISA, raising=False)
        else:
            monkeypatch.setenv(cpu.ENV_ISA, cap)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu.gemm_dtype() == want and cpu.fast_dtype() == want, (cap, bf16, amx)
        assert cpu.amx() == (amx and cap is None)
    monkeypatch.setenv(cpu.ENV_ISA, "sse4")
    with pytest.raises(ValueError, match=cpu.ENV_ISA):
        cpu.gemm_dtype()
    monkeypatch.delenv(cpu.ENV_ISA)
    monkeypatch.setenv(cpu.ENV_GEMM, "fp16")
    with pytest.raises(ValueError, match=cpu.ENV_GEMM):
        cpu.gemm_dtype()


def test_project_variables_old_names(monkeypatch, caplog):
    """DPQ_* names are read first; the old VLLM_DPQ_* ones still work, with a deprecation warning."""
    from vllm_dpq import env

    env._deprecated.cache_clear()  # warned once per process and name
    monkeypatch.delenv(cpu.ENV_GEMM, raising=False)
    monkeypatch.setenv("VLLM_" + cpu.ENV_GEMM, "float32")
    with caplog.at_level("WARNING", logger="vllm_dpq"):
        assert cpu.gemm_dtype() == torch.float32
    assert "deprecated" in caplog.text and cpu.ENV_GEMM in caplog.text
    monkeypatch.setenv(cpu.ENV_GEMM, "bfloat16")
    assert cpu.gemm_dtype() == torch.bfloat16  # the new name wins
    with pytest.raises(ValueError, match="DPQ_"):
        env.get("VLLM_DPQ_BACKEND")


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


def test_cpu_kernel_loads_past_a_dead_builders_lock():
    """A build killed mid-way leaves torch's lock file behind, on which torch's loader would
    wait forever (every later vLLM start hung); the kernel loader removes it and loads."""
    import subprocess
    import sys

    build = cpu.build_directory()
    build.mkdir(parents=True, exist_ok=True)
    (build / "lock").touch()
    r = subprocess.run([sys.executable, "-c", "from vllm_dpq.kernels.cpu import kernels; print(kernels() is not None)"],
                       capture_output=True, text=True, timeout=900)
    assert r.stdout.strip() == "True", r.stderr[-3000:]
    assert not (build / "lock").exists()
