"""The W4A8 chain (DPQ spec sections 1-2), packing and group-size edge cases."""

import math

import pytest
import torch

from calibration.algorithms import quantize_rtn
from vllm_dpq.numerics import (
    FP8_DTYPE, Scheme, compute_weight_scale, expand_groups, fp8_round, group_view, max_group_scale,
    protective_range, quantize_activation, round_scale,
)
from vllm_dpq.packing import _pack_int4_local, pack_int4, unpack_int4, unpack_int4_reference

def compute_group_scales(w, s_w, scheme):
    """The spec's s_g = 2 max|W8[group]| / 15, rounded to the storage dtype (DPQ spec section 2)."""
    s = max_group_scale(group_view(w, scheme.group(w.shape[1])), s_w, scheme.fp8_max)
    return round_scale(s, scheme.scale_dtype, scheme.fp8_max)


SCHEMES = [
    Scheme(group_size=g, weight_scale=ws, group_scale_dtype=sd, fp8_max=fm)
    for g in (32, 64, 128, -1)
    for ws in ("tensor", "channel")
    for sd in ("bfloat16", "float8_e4m3fn")
    for fm in (448.0, 240.0)
]


def weight(n=96, k=576, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    w[3] *= 40  # an outlier row, so per-tensor and per-channel scales differ
    return w


def is_fp8_value(x: torch.Tensor) -> bool:
    return torch.equal(x, x.to(FP8_DTYPE).float())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"g{s.group_size}-{s.weight_scale}-{s.group_scale_dtype}-{s.fp8_max:g}")
def test_chain_invariants(scheme):
    w = weight()
    qw = quantize_rtn(w, scheme)
    n, k = w.shape
    assert qw.q.dtype == torch.int8 and qw.q.min() >= -8 and qw.q.max() <= 7
    s_g = qw.group_scale.float()
    assert qw.group_scale.dtype == scheme.scale_dtype
    assert s_g.shape == (n, math.ceil(k / scheme.group(k)))
    assert (s_g > 0).all() and (8 * s_g <= scheme.fp8_max).all()
    s_w = qw.weight_scale
    assert s_w.shape == ((n,) if scheme.weight_scale == "channel" else (1,))
    assert torch.equal(torch.exp2(torch.log2(s_w).round()), s_w), "s_w must be a power of two"
    # every effective weight is exactly an FP8 value (within +-fp8_max) times s_w
    w8 = qw.fp8(scheme.fp8_max)
    assert is_fp8_value(w8) and w8.abs().max() <= scheme.fp8_max
    assert torch.equal(qw.dequantize(scheme.fp8_max), s_w.reshape(-1, 1) * w8)
    # and the chain is an approximation of w, not garbage
    rel = (qw.dequantize(scheme.fp8_max) - w).norm() / w.norm()
    assert rel < 0.2


def test_weight_scale_protective_range():
    w = weight()
    for per_channel in (False, True):
        s_w = compute_weight_scale(w, per_channel, 448.0)
        amax = w.abs().amax(dim=1) if per_channel else w.abs().max()
        pr = protective_range(448.0)
        assert (amax / s_w <= pr).all() and (amax / s_w > pr / 2).all()  # smallest such power of two


def test_codes_round_once_from_uncast_weight():
    """The spec's reference rounds once: q = round((W / s_w) / s_g), W8 only fits the scales."""
    scheme = Scheme(group_size=32)
    w = weight()
    qw = quantize_rtn(w, scheme)
    s_g = expand_groups(qw.group_scale.float(), w.shape[1], 32)
    expected = torch.round(w / qw.weight_scale / s_g).clamp(-8, 7)
    assert torch.equal(qw.q.float(), expected)
    # the group scales are fitted on the FP8-cast weight
    assert torch.equal(compute_group_scales(w, qw.weight_scale, scheme), qw.group_scale.float())


def test_fp8_round_is_rne_and_saturates():
    x = torch.tensor([1000.0, -1000.0, 448.0, 0.0, 1.0625, 1.1875, 17.0, 2.0**-10, 3 * 2.0**-10, -1.0625, 464.0])
    y = fp8_round(x)
    assert y[0] == 448 and y[1] == -448 and y[2] == 448 and y[3] == 0
    assert y[4] == 1.0  # 1.0625 is halfway between 1.0 and 1.125: ties to even (1.0)
    assert y[5] == 1.25  # halfway between 1.125 and 1.25: even mantissa is 1.25
    assert y[6] == 16.0  # 17 halfway between 16 and 18: even -> 16
    assert y[7] == 0.0  # 2^-10 is halfway between 0 and the smallest subnormal 2^-9: even -> 0
    assert y[8] == 2.0**-8  # 3 * 2^-10 halfway between 2^-9 (odd) and 2^-8 (even mantissa)
    assert y[9] == -1.0  # ties to even on the negative side too (not away from zero)
    assert y[10] == 448.0  # above the largest finite value: saturates, never NaN
    assert fp8_round(torch.tensor([300.0]), 240.0).item() == 240.0


def test_fp8_round_every_midpoint_ties_to_even():
    """Every midpoint between two neighbouring e4m3fn values rounds to the one whose code
    (bit pattern) is even, and anything just off the midpoint to the nearer one: the
    specification of round-to-nearest-even, written from the bit patterns, not from a cast."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # +0 ... 448 (127 is NaN)
    vals = codes.view(FP8_DTYPE).float()
    lo, hi = vals[:-1], vals[1:]
    mid = (lo + hi) / 2  # exact in fp32
    even = torch.where(codes[:-1] % 2 == 0, lo, hi)
    for sign in (1.0, -1.0):
        assert torch.equal(fp8_round(sign * mid), sign * even)
        below = torch.nextafter(mid, torch.zeros_like(mid))
        above = torch.nextafter(mid, torch.full_like(mid, 1e9))
        assert torch.equal(fp8_round(sign * below), sign * lo)
        assert torch.equal(fp8_round(sign * above), sign * hi)
        assert torch.equal(fp8_round(sign * vals), sign * vals)  # FP8 values are fixed points


@pytest.mark.parametrize("k", [8, 20, 576, 1536, 1])
def test_pack_unpack_roundtrip(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (5, k), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, math.ceil(k / 8))
    assert torch.equal(unpack_int4(packed, k), q)
    assert torch.equal(unpack_int4_reference(packed, k), q)  # compressed-tensors' own unpack
    assert torch.equal(_pack_int4_local(q), packed)  # the fallback packer, same layout


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.tensor([[1]], dtype=torch.int32))


@pytest.mark.parametrize("k,g,groups", [(576, 128, 5), (576, 64, 9), (576, 32, 18), (100, 32, 4), (20, -1, 1), (16, 128, 1)])
def test_group_size_edge_cases(k, g, groups):
    """K not a multiple of G: the last group is shorter (ragged), never a crash."""
    w = weight(8, k)
    scheme = Scheme(group_size=g)
    qw = quantize_rtn(w, scheme)
    assert qw.group_scale.shape == (8, groups)
    gs = scheme.group(k)
    start = (groups - 1) * gs
    # the ragged last group's scale is fitted on its own columns only
    s_last = compute_group_scales(w[:, start:], qw.weight_scale, Scheme(group_size=-1))
    assert torch.equal(qw.group_scale[:, -1:].float(), s_last)
    # column c belongs to group c // G: the last group holds exactly the k - start leftover columns,
    # and the codes and effective weights of every column use that column's own group scale
    owner = torch.arange(k) // gs
    s_full = qw.group_scale.float()[:, owner]
    assert torch.equal(expand_groups(qw.group_scale.float(), k, gs), s_full)
    assert torch.equal(qw.q.float(), torch.round(w / qw.weight_scale / s_full).clamp(-8, 7))
    assert torch.equal(qw.dequantize(448.0), qw.weight_scale * fp8_round(qw.q.float() * s_full))


def test_zero_weight_and_bad_input():
    qw = quantize_rtn(torch.zeros(4, 64), Scheme(group_size=32))
    assert (qw.q == 0).all() and (qw.group_scale.float() > 0).all() and torch.isfinite(qw.weight_scale).all()
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(torch.full((4, 64), float("nan")), Scheme())
    with pytest.raises(ValueError):
        Scheme(group_size=0)
    with pytest.raises(ValueError):
        Scheme(fp8_max=1000.0)


def test_fp8_group_scales_small_values_stay_positive():
    w = weight()
    w[:, :32] *= 1e-6  # a group whose scale underflows FP8
    qw = quantize_rtn(w, Scheme(group_size=32, group_scale_dtype="float8_e4m3fn"))
    assert (qw.group_scale.float() > 0).all()


@pytest.mark.parametrize("static", [False, True])
def test_activation_quantization(static):
    x = torch.randn(6, 64) * 3
    x[2] = 0  # an all-zero token
    scale = torch.tensor([x.abs().max().item() / 448]) if static else None
    x8, s_x = quantize_activation(x, scale)
    assert is_fp8_value(x8) and x8.abs().max() <= 448
    assert s_x.shape == ((1, 1) if static else (6, 1))
    assert torch.isfinite(x8 * s_x).all()
    assert ((x8 * s_x - x).abs() <= x.abs() * 2**-4 + 1e-6).all()
