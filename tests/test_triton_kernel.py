"""The Triton W4A8 backend, checked on CPU (no GPU here).

Three kinds of checks:

* Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported: each check runs
  this file in a subprocess) runs the real kernels on CPU tensors. It supports FP8: ``tl.dot``
  on float8e4nv operands, loads/stores of fp8 tensors, and fp8 -> fp32. Its fp32 -> float8e4nv
  conversion does not round to nearest even (ties away from zero, mantissa carry into the
  exponent dropped: 126.6 -> 64.0; Triton 3.6 also loses the sign of -0.0), so under the
  interpreter the kernels use their exact integer RNE emulation (``EMULATE_RNE``), which is
  also what the activation kernel uses on the GPU by default; the GPU's hardware conversion
  (used for the weight tiles) is checked exhaustively by the GPU tests (tests/test_triton_gpu.py,
  ``pytest -m gpu``), which share this file's case generators and pass criteria
  (tests/kernel_cases.py) at GPU-sized shapes.
  Checked: the FP8 rounding, activation quantization and the dequantized weight tiles bit for
  bit; the fused GEMM (both unpack modes, split-K, every group layout, bf16/fp8 group scales,
  static/dynamic, bias, fp16/fp32/3-D inputs), the dequantize + torch._scaled_mm path, and
  the backend's custom op under torch.compile(fullgraph=True) with the environment resolved at
  prepare, against ``numerics.reference_linear``.
* Ahead-of-time compilation for sm_89 / sm_90 / sm_100 with the ptxas that Triton's wheel
  carries (no GPU needed): the kernels compile, use tensor-core MMA, divide with div.rn, and
  do not spill registers.
* Host side: dispatch (never triton on CPU; DPQ_BACKEND=triton on CPU is a clear error;
  the package imports without triton and then says why triton is unavailable), the config
  table, the environment read once at prepare, the resident layout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


from kernel_cases import (  # tests/kernel_cases.py: shared with tests/test_triton_gpu.py
    ACT_DTYPES,
    ACT_SHAPES_SMALL,
    ACT_STATIC_SCALES,
    SCALE_DTYPES,
    TILE_SHAPES_SMALL,
    UNPACK_MODES,
    activation_input,
    activation_mismatch,
    cast_probe_values,
    close,
    gemm_cases_small,
    make,
    synthetic_weights,
    tile_mismatches,
)

# ----------------------------------------------------------------------------- interpreter side
# These functions run in a subprocess with TRITON_INTERPRET=1. Each returns a dict with a
# "failures" list; the pytest side asserts it is empty.

def _case_cast() -> dict:
    """fp32 -> e4m3 rounding through the activation kernel (static scale 1: x / 1 is exact)."""
    from vllm_dpq.kernels import triton as tw
    from vllm_dpq.numerics import FP8_DTYPE

    x = cast_probe_values()
    ref = x.clamp(-448, 448).to(FP8_DTYPE)
    one = torch.ones(1)
    failures = []
    xq, _ = tw.quantize_activation_fp8(x.reshape(1, -1), one, 448.0)
    bad = xq.view(torch.uint8) != ref.view(torch.uint8)
    if bad.any():
        failures.append(f"emulated RNE: {int(bad.sum())} of {x.numel()} differ, e.g. {x[bad.reshape(-1)][:5].tolist()}")
    # the interpreter's own conversion, for the record
    xq_native = torch.empty_like(xq)
    sx = torch.empty(1)
    x2 = x.reshape(1, -1).contiguous()
    tw.kernels().act_quant_kernel[(1,)](x2, xq_native, sx, one, x.numel(), x.numel(), x2.stride(0),
                                        xq_native.stride(0), 448.0, STATIC=True, BLOCK_K=1024, EMULATE_RNE=False)
    native_bad = xq_native.view(torch.uint8) != ref.view(torch.uint8)
    example = None
    if native_bad.any():
        i = int(native_bad.reshape(-1).nonzero()[0])
        example = [float(x[i]), float(xq_native.reshape(-1)[i].float()), float(ref[i].float())]
    settings = tw.TritonSettings.from_env()
    return {"failures": failures, "n": x.numel(), "native_mismatches": int(native_bad.sum()),
            "native_example": example,
            "emulate_under_interpreter": settings.emulate_act_rne and settings.emulate_weight_rne}


def _case_act() -> dict:
    from vllm_dpq.kernels import triton as tw

    g = torch.Generator().manual_seed(1)
    failures = []
    for (m, k), dtype in itertools.product(ACT_SHAPES_SMALL, ACT_DTYPES):
        x = activation_input(m, k, dtype, g)
        for static in ACT_STATIC_SCALES:
            s_in = None if static is None else torch.tensor([static])
            for k_out in (k, k + 4):
                xq, sx = tw.quantize_activation_fp8(x, s_in, 448.0, k_out=k_out, block_k=128)
                err = activation_mismatch(xq, sx, x, s_in, 448.0)
                if err:
                    failures.append(f"act quant {dtype} static={static} k_out={k_out}: {err}")
    x = activation_input(3, 64, torch.bfloat16, g)
    for fp8_max in (240.0, 448.0):
        xq, sx = tw.quantize_activation_fp8(x, None, fp8_max)
        err = activation_mismatch(xq, sx, x, None, fp8_max)
        if err:
            failures.append(f"act quant fp8_max={fp8_max}: {err}")
    return {"failures": failures}


def _case_dequant() -> dict:
    from vllm_dpq.kernels import triton as tw
    from vllm_dpq.numerics import FP8_DTYPE

    failures = []
    checked = 0
    for i, (n, k, group) in enumerate(TILE_SHAPES_SMALL):
        for sdt in (torch.bfloat16, FP8_DTYPE):
            for fp8_max in ((448.0, 240.0) if i == 1 else (448.0,)):
                w = synthetic_weights(n, k, group, sdt, fp8_max, seed=n + k)
                st = tw.prepare_weights(w)
                for unpack in UNPACK_MODES:
                    for bk in (32, 64):
                        got = tw.dequantize_weight(st, layout="nk", block_k=bk, block_n=16, unpack=unpack)
                        checked += 1
                        bad = tile_mismatches(got, w)
                        if bad:
                            failures.append(f"dequant n={n} k={k} g={group} {sdt} max={fp8_max} {unpack} bk={bk}: "
                                            f"{bad} differ")
                kn = tw.dequantize_weight(st, layout="kn", k_out=k + 5, n_out=n + 3)
                if tile_mismatches(kn[:k, :n].t(), w) or (kn[k:].float() != 0).any() or (kn[:, n:].float() != 0).any():
                    failures.append(f"dequant kn padded n={n} k={k} g={group}")
    return {"failures": failures, "checked": checked}


def _case_gemm() -> dict:
    from vllm_dpq.kernels import triton as tw
    from vllm_dpq.kernels.triton import TritonConfig
    from vllm_dpq.numerics import Scheme, reference_linear

    failures = []
    count = 0

    def check(label, n, k, g, m, sdt="bfloat16", static=False, channel=False, config=None, dtype=torch.bfloat16,
              path="fused", fp8_max=448.0, shape3d=False):
        nonlocal count
        scheme = Scheme(group_size=g, group_scale_dtype=sdt, weight_scale="channel" if channel else "tensor",
                        fp8_max=fp8_max)
        qw, x, s_x, bias, w = make(n, k, scheme, static, seed=count, m=m, dtype=dtype)
        st = tw.TritonBackend().prepare(w)
        for b in (None, bias):
            xx = x.reshape(m, 1, k) if shape3d else x
            y = tw.linear(st, xx, b, config=config, path=path)
            ref = reference_linear(x, qw, scheme.fp8_max, s_x, b, out_dtype=dtype)
            count += 1
            if y.shape != (*xx.shape[:-1], n) or y.dtype != dtype:
                failures.append(f"{label}: shape/dtype {tuple(y.shape)} {y.dtype}")
            elif not close(y.reshape(m, n), ref, b):
                err = (y.reshape(m, n).float() - ref.float()).abs().max().item()
                failures.append(f"{label} bias={b is not None}: max err {err}")

    for c in gemm_cases_small():
        check(f"gemm {c}", c["n"], c["k"], c["g"], c["m"], c["sdt"], c["static"], c["channel"], c["config"])
    # several M tiles with grouped ordering, ragged group with a tile-aligned group size, G % BK == 0
    check("m=37 grouped", 40, 200, 64, 37, config=TritonConfig(16, 16, 32, group_m=2))
    check("g%bk==0 ragged", 24, 200, 64, 5, SCALE_DTYPES[1], config=TritonConfig(16, 32, 64))
    check("g%bk==0 reshape", 24, 256, 128, 5, config=TritonConfig(16, 32, 128, split_k=2))
    check("fp16 out", 24, 100, 32, 5, dtype=torch.float16)
    check("fp32 out", 24, 100, 32, 5, dtype=torch.float32, static=True)
    check("fp8_max 240", 24, 72, 32, 5, fp8_max=240.0)
    check("3-d input", 24, 72, 32, 5, shape3d=True)
    check("dequant path", 40, 100, 32, 9, path="dequant")
    check("dequant path static fp8", 24, 256, 64, 9, SCALE_DTYPES[1], static=True, channel=True, path="dequant")

    # TritonBackend.apply goes through one custom op, opaque to torch.compile(fullgraph=True);
    # the environment is read by prepare only, and reaches the op as arguments
    scheme = Scheme(group_size=32)
    qw, x, s_x, bias, w = make(40, 100, scheme, False, seed=99, m=5)
    ref = reference_linear(x, qw, scheme.fp8_max, s_x, bias)
    backend = tw.TritonBackend()
    override = tw.TritonConfig(16, 16, 32, 2, 4, 3, unpack="gather")
    envs = {"plain": ({}, {}), "config": ({tw.ENV_CONFIG: "16,16,32,2,4,3,gather"}, dict(config=override)),
            "dequant": ({tw.ENV_DEQUANT_M: "1"}, dict(path="dequant"))}
    for name, (overrides, same_as) in envs.items():
        os.environ.update(overrides)
        st = backend.prepare(w)
        for var in overrides:
            del os.environ[var]
        y_op = backend.apply(st, x, bias)
        compiled = torch.compile(lambda xx, bb: backend.apply(st, xx, bb) * 1, fullgraph=True, backend="eager")
        y_c = compiled(x, bias)
        if not (close(y_op, ref, bias) and torch.equal(y_op, tw.linear(st, x, bias, **same_as))
                and torch.equal(y_c, y_op)):
            failures.append(f"custom op / torch.compile(fullgraph=True), environment {name}")
    return {"failures": failures, "checked": count}


def _case_moe() -> dict:
    """DPQ's MoE op (vllm_dpq.plugin.moe_method.moe_experts) with every expert's GEMMs on the
    Triton backend: per token, the router-weighted sum over its experts of
    down(silu(gate(x)) * up(x)), each GEMM against reference_linear (same grouping)."""
    import torch.nn.functional as F

    from vllm_dpq.kernels import triton as tw
    from vllm_dpq.numerics import Scheme, reference_linear
    from vllm_dpq.plugin import moe_method

    scheme, experts, h, inter, top_k = Scheme(group_size=32), 4, 64, 32, 2
    backend = tw.TritonBackend()
    layers, states = [], []
    for e in range(experts):
        qw13, *_, w13 = make(2 * inter, h, scheme, False, seed=10 + e)
        qw2, *_, w2 = make(h, inter, scheme, False, seed=20 + e)
        layers.append((qw13, qw2))
        states.append(((backend, backend.prepare(w13)), (backend, backend.prepare(w2))))
    layer = torch.nn.Module()  # what the op reads of a loaded MoE layer (held here: the registry is weak)
    layer._dpq_experts, layer.intermediate_size_per_partition = states, inter
    moe_method._LAYERS["interpreted"] = layer
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, h, generator=g) * 2).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(6)])
    ids[:, 0] = 0  # expert 0 gets every token, expert 3 maybe none
    weights = torch.rand(6, top_k, generator=g)
    y = moe_method.moe_experts(x, weights, ids, "interpreted")
    ref = torch.zeros(6, h)
    for t in range(6):
        for slot in range(top_k):
            qw13, qw2 = layers[int(ids[t, slot])]
            gu = reference_linear(x[t:t + 1], qw13, 448.0, None, None, out_dtype=torch.bfloat16)
            act = F.silu(gu[:, :inter]) * gu[:, inter:]
            ref[t] += weights[t, slot] * reference_linear(act, qw2, 448.0, None, None, out_dtype=torch.bfloat16)[0].float()
    # the op's grouping and combination, exactly: the same Triton GEMMs on each expert's tokens
    same = torch.zeros(6, h)
    for e, ((b13, st13), (b2, st2)) in enumerate(states):
        token, slot = torch.where(ids == e)
        if token.numel():
            gu = b13.apply(st13, x[token])
            same.index_add_(0, token, b2.apply(st2, F.silu(gu[:, :inter]) * gu[:, inter:]).float()
                            * weights[token, slot, None])
    # against reference_linear: a one-ulp difference of the bf16 gate/up output moves down's
    # per-token FP8 scale, so whole rows of FP8 roundings can differ [measured: 1.6% of max]
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    failures = [f"moe: rel err {err} vs reference_linear"] if err >= 3e-2 else []
    if not torch.equal(y, same.to(y.dtype)):
        failures.append("moe: differs from the same Triton GEMMs grouped by hand")
    return {"failures": failures, "rel_err": err}


CASES = {"cast": _case_cast, "act": _case_act, "dequant": _case_dequant, "gemm": _case_gemm, "moe": _case_moe}


def run_interpreted(case: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DPQ_TRITON_CONFIG", None)
    p = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    assert p.returncode == 0, f"interpreter run {case!r} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- pytest side

def _triton_error():
    from vllm_dpq.kernels.triton import triton_import_error

    return triton_import_error()


needs_triton = pytest.mark.skipif(_triton_error() is not None, reason=f"triton not importable: {_triton_error()}")


@needs_triton
def test_interpreter_fp8_cast():
    r = run_interpreted("cast")
    assert r["failures"] == []
    # we never rely on the interpreter's own rounding: it is wrong in Triton 3.6-3.9
    if r["native_mismatches"]:
        assert r["emulate_under_interpreter"], r
    print("interpreter native fp32->fp8 mismatches:", r["native_mismatches"], "of", r["n"], r["native_example"])


@needs_triton
def test_interpreter_activation_quantization_bit_exact():
    assert run_interpreted("act")["failures"] == []


@needs_triton
def test_interpreter_weight_tiles_bit_exact():
    r = run_interpreted("dequant")
    assert r["failures"] == [] and r["checked"] > 0


@needs_triton
def test_interpreter_gemm_matches_reference():
    r = run_interpreted("gemm")
    assert r["failures"] == [] and r["checked"] >= 50


@needs_triton
def test_interpreter_moe_experts_match_reference():
    pytest.importorskip("vllm")
    assert run_interpreted("moe")["failures"] == []


def _weights(n=16, k=64):
    from vllm_dpq.numerics import Scheme

    return make(n, k, Scheme(group_size=32), False, m=3)[4]


def test_registered_and_preferred_on_cuda():
    from vllm_dpq.kernels import BACKENDS, PREFERENCE

    assert "triton" in BACKENDS
    assert PREFERENCE["cuda"][0] == "triton" and "scaled_mm" in PREFERENCE["cuda"]


def test_dispatch_never_picks_triton_on_cpu(monkeypatch):
    from vllm_dpq.kernels import ENV_BACKEND, select_backend

    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert select_backend(_weights(), "cpu").name == "cpu"


def test_forcing_triton_on_cpu_is_a_clear_error(monkeypatch):
    from vllm_dpq.kernels import ENV_BACKEND, select_backend

    monkeypatch.setenv(ENV_BACKEND, "triton")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run this layer: runs on CUDA GPUs only"):
        select_backend(_weights(), "cpu")


def test_unsupported_reasons():
    from vllm_dpq.kernels.triton import TritonBackend

    b = TritonBackend()
    w = _weights()
    assert "CUDA GPUs only" in b.unsupported(w, torch.device("cpu"))
    if not torch.cuda.is_available():
        reason = b.unsupported(w, torch.device("cuda"))
        assert reason and ("CUDA is not available" in reason or "triton" in reason)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, vllm_dpq.kernels as k\n"
            "from vllm_dpq.kernels.triton import TritonBackend, triton_import_error\n"
            "assert triton_import_error() is not None\n"
            "from calibration.algorithms import quantize_rtn\nfrom vllm_dpq.numerics import Scheme\n"
            "from vllm_dpq.packing import pack_int4\n"
            "qw = quantize_rtn(torch.randn(8, 32), Scheme())\n"
            "w = k.W4A8Weights(pack_int4(qw.q), qw.group_scale, qw.weight_scale, None, 32, 32)\n"
            "r = TritonBackend().unsupported(w, torch.device('cuda'))\n"
            "assert 'triton is not importable' in r, r\n"
            "assert k.select_backend(w, 'cpu').name == 'cpu'\n"
            "for override in (None, 'triton'):\n"
            "    try:\n"
            "        k.select_backend(w, 'cuda', override)\n"
            "    except (RuntimeError, ValueError) as e:\n"
            "        assert 'triton is not importable' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('triton selected without triton')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pick_config_table(monkeypatch):
    from vllm_dpq.kernels import triton as tw

    monkeypatch.delenv(tw.ENV_CONFIG, raising=False)
    for m in (1, 7, 16, 17, 64, 65, 300, 4096):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096), (24, 72)):
            c = tw.pick_config(m, n, k, 132)
            assert c.block_k >= 32 and c.block_m >= 16
            if m > 64:
                assert c.split_k == 1
            # split-K workspace stays under a quarter of the INT4 weight bytes
            assert c.split_k == 1 or c.split_k * m * n * 4 <= n * k / 2 / 4
    assert tw.pick_config(1, 4096, 4096, 132).split_k > 1  # decode fills the GPU
    with pytest.raises(ValueError):
        tw.TritonConfig(16, 16, 16)
    # the table reads no environment: the override is resolved once, by prepare
    monkeypatch.setenv(tw.ENV_CONFIG, "32,64,128,2,4,3,gather")
    assert tw.pick_config(1, 64, 64) == tw.pick_config(1, 64, 64, 132)
    assert tw.pick_config(1, 64, 64).block_m == 16


def test_settings_resolved_once_at_prepare(monkeypatch):
    """DPQ_TRITON_CONFIG / _DEQUANT_M / _RNE are read and validated by prepare and kept
    in the state; changing the environment later changes nothing."""
    from vllm_dpq.kernels import triton as tw

    for var in (tw.ENV_CONFIG, tw.ENV_DEQUANT_M, tw.ENV_RNE, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    w = _weights()
    st = tw.TritonBackend().prepare(w)
    assert st.settings == tw.TritonSettings(None, tw.DEFAULT_DEQUANT_M, True, False)
    monkeypatch.setenv(tw.ENV_CONFIG, "32,64,128,2,4,3,gather")
    monkeypatch.setenv(tw.ENV_DEQUANT_M, "64")
    monkeypatch.setenv(tw.ENV_RNE, "emulate")
    assert st.settings == tw.TritonSettings(None, tw.DEFAULT_DEQUANT_M, True, False)  # resolved already
    st = tw.TritonBackend().prepare(w)
    cfg = tw.TritonConfig(32, 64, 128, 2, 4, 3, unpack="gather")
    assert st.settings == tw.TritonSettings(cfg, 64, True, True)
    assert tw.TritonConfig.from_ints(cfg.to_ints()) == cfg  # how the custom op receives it
    monkeypatch.setenv(tw.ENV_RNE, "hw")
    assert tw.prepare_weights(w).settings.emulate_act_rne is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter's own fp8 conversion is wrong
    s = tw.prepare_weights(w).settings
    assert s.emulate_act_rne and s.emulate_weight_rne
    for var, bad, message in ((tw.ENV_CONFIG, "32,64", tw.ENV_CONFIG), (tw.ENV_CONFIG, "32,64,128,3,4,3", "split_k"),
                              (tw.ENV_DEQUANT_M, "many", tw.ENV_DEQUANT_M), (tw.ENV_RNE, "fast", tw.ENV_RNE)):
        with monkeypatch.context() as mp:
            mp.setenv(var, bad)
            with pytest.raises(ValueError, match=message):
                tw.TritonBackend().prepare(w)


def test_prepare_layout_and_validation():
    from vllm_dpq.kernels.base import W4A8Weights
    from vllm_dpq.kernels.triton import prepare_weights

    w = _weights(24, 100)
    st = prepare_weights(w)
    assert st.qweight.shape == (13, 24) and torch.equal(st.qweight, w.packed.t())
    assert st.scales.shape == (4, 24) and st.weight_scale.shape == (24,)
    assert st.weight_scale_padded.shape == (1, 32)
    bad = W4A8Weights(w.packed[:, :5], w.group_scale, w.weight_scale, None, 100, 32)
    with pytest.raises(ValueError, match="packed weight"):
        prepare_weights(bad)


# ----------------------------------------------------------------------------- AOT compile

def _aot(kernel, signature, constexprs, cap, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _resource_usage(cubin: bytes) -> dict:
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", out)}


def _nvidia_aot_available():
    if _triton_error() is not None:
        return False
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


GEMM_SIG = {"xq_ptr": "*fp8e4nv", "sx_ptr": "*fp32", "wq_ptr": "*i32", "sg_ptr": "*bf16", "sw_ptr": "*fp32",
            "bias_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_wq": "i32", "stride_sg": "i32", "stride_ym": "i32", "fp8_max": "fp32"}


@pytest.mark.skipif(not _nvidia_aot_available(), reason="triton's NVIDIA backend (ptxas, cuobjdump) not available")
@pytest.mark.parametrize("cap,m", [(90, 1), (90, 4096), (89, 64), (100, 256)])
def test_aot_compile_for_gpus(cap, m):
    """The table's configs compile for the real targets, use FP8 MMA, RNE casts, no spills."""
    from vllm_dpq.kernels import triton as tw

    ks = tw.kernels()
    cfg = tw.pick_config(m, 4096, 4096, 132)
    consts = {"GROUP": 32, "PER_CHANNEL": False, "HAS_BIAS": True, "BLOCK_M": cfg.block_m,
              "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k, "GROUP_M": cfg.group_m,
              "UNPACK": cfg.unpack, "EMULATE_RNE": False}
    sig = dict(GEMM_SIG, sg_ptr="*fp8e4nv")
    k = _aot(ks.w4a8_gemm_kernel, sig, consts, cap, cfg.num_warps, cfg.num_stages)
    ptx = k.asm["ptx"]
    # weight tiles: the hardware conversion (Triton 3.6 on sm_89 goes through fp16, exact for
    # the at most 11-bit products q * s_g)
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx or "cvt.rn.satfinite.e4m3x2.f16x2" in ptx
    mma = re.findall(r"(wgmma\.mma_async\S*e4m3|mma\.sync\S*e4m3\S*|mma\.sync\S*f16\.f16\S*"
                     r"|tcgen05\.mma\S*f8f6f4)", ptx)
    assert mma, "no tensor-core MMA in the PTX"
    if cap == 90 and cfg.block_m >= 64:
        assert any(s.startswith("wgmma") for s in mma)
    usage = _resource_usage(k.asm["cubin"])
    assert usage.get("STACK", 0) == 0, f"register spills: {usage}"


@pytest.mark.skipif(not _nvidia_aot_available(), reason="triton's NVIDIA backend (ptxas, cuobjdump) not available")
def test_aot_activation_kernel_uses_ieee_division(monkeypatch):
    from vllm_dpq.kernels import triton as tw

    monkeypatch.delenv(tw.ENV_RNE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sig = {"x_ptr": "*bf16", "xq_ptr": "*fp8e4nv", "sx_ptr": "*fp32", "s_in_ptr": "*fp32", "K": "i32",
           "K_OUT": "i32", "stride_xm": "i32", "stride_qm": "i32", "fp8_max": "fp32"}
    settings = tw.TritonSettings.from_env()  # default: activations emulated, weights hardware
    assert (settings.emulate_act_rne, settings.emulate_weight_rne) == (True, False)
    for cap in (89, 90):
        k = _aot(tw.kernels().act_quant_kernel, sig, {"STATIC": False, "BLOCK_K": 1024, "EMULATE_RNE": True}, cap)
        ptx = k.asm["ptx"]
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
        assert "e4m3" not in ptx  # the byte is built with integer ops: no conversion to rely on
        assert _resource_usage(k.asm["cubin"]).get("STACK", 0) == 0


if __name__ == "__main__":  # interpreter subprocess: python tests/test_triton_kernel.py CASE
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    print(json.dumps(CASES[sys.argv[1]]()))
