"""GPTQ / DPQ / GAR on single layers: the properties DPQ_SPEC section 3 promises."""

import hashlib
import warnings

import pytest
import torch

from calibration.algorithms import (
    PAPER_RECIPE, Recipe, hessian_update, processing_order, quantize_layer,
)
from vllm_dpq.interop.fold import folded_scheme
from vllm_dpq.numerics import Scheme


def correlated_layer(n=256, k=512, samples=4096, seed=0):
    """A layer whose inputs have strongly correlated, unevenly scaled channels (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(samples, 64, generator=g) @ torch.randn(64, k, generator=g)) + 0.5 * torch.randn(samples, k, generator=g) @ mix
    x = x * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    h, _ = hessian_update(torch.zeros(k, k), 0, x)
    return w, x, h


def out_err(x, w, w_eff):
    y = x @ w.t()
    return ((x @ w_eff.t() - y).norm() / y.norm()).item()


@pytest.mark.parametrize("g", [32, 64, 128])
def test_dpq_beats_gptq_cast_beats_rtn(g):
    w, x, h = correlated_layer()
    err = {m: out_err(x, w, quantize_layer(w, h, Recipe(method=m, scheme=Scheme(group_size=g))).w_eff)
           for m in ("rtn", "gptq", "dpq")}
    assert err["dpq"] < 0.97 * err["gptq"], err
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_paper_recipe_is_available_and_differs():
    w, x, h = correlated_layer()
    paper = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32), **PAPER_RECIPE))
    ours = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32)))
    assert not torch.equal(paper.qw.q, ours.qw.q)
    assert out_err(x, w, ours.w_eff) < out_err(x, w, paper.w_eff)


@pytest.mark.parametrize("codes", ["round", "nearest"])
def test_dpq_with_exact_fp8_is_gptq(monkeypatch, codes):
    """With the FP8 step made exact (identity rounding), DPQ reduces to plain GPTQ."""
    w, _, h = correlated_layer(n=64, k=256)
    scheme = Scheme(group_size=32)
    gptq = quantize_layer(w, h, Recipe(method="gptq", scheme=scheme, codes=codes, scale_search="mse",
                                       refit_scales=False, order="gar"))  # dpq's defaults
    for module in ("calibration.algorithms", "vllm_dpq.numerics"):  # every use of the FP8 rounding
        monkeypatch.setattr(f"{module}.fp8_round", lambda v, fp8_max: v.float())
    dpq = quantize_layer(w, h, Recipe(method="dpq", scheme=scheme, codes=codes))
    assert torch.equal(dpq.qw.q, gptq.qw.q)
    assert torch.equal(dpq.qw.group_scale, gptq.qw.group_scale)


def test_recipe_defaults_per_method():
    """dpq: GAR and asymmetric calibration on; gptq defaults to standard GPTQ; explicit values win."""
    fields = lambda r: (r.order, r.asym, r.scale_search, r.codes, r.refit_scales)  # noqa: E731
    assert fields(Recipe()) == fields(Recipe(method="dpq")) == ("gar", True, "mse", "nearest", False)
    assert fields(Recipe(method="rtn")) == ("none", False, "mse", "nearest", False)
    assert fields(Recipe(method="gptq")) == ("none", False, "max", "round", True)
    assert fields(Recipe(method="gptq", refit_scales=False, scale_search="mse")) == \
        ("none", False, "mse", "round", False)
    assert fields(Recipe(order="none", asym=False)) == ("none", False, "mse", "nearest", False)
    assert Recipe(method="gptq", order="act").refit_scales is False  # act-order needs fixed scales
    assert list(Recipe().to_dict()) == ["method", "order", "damp", "block_size", "scale_search", "codes",
                                        "refit_scales", "hessian_fp8", "fold", "experts", "expert_min_tokens",
                                        "asym", "asym_alpha", "true_sequential", "tune_steps"]


def test_refit_uses_block_start_weights():
    """Standard GPTQ's refit (gptq.py: find_params(W[:, j:j+g])) fits a group that starts inside
    a block on the weights as they stood at the block start, without the block's earlier updates."""
    w, _, h = correlated_layer(n=64, k=256)
    r = quantize_layer(w, h, Recipe(method="gptq", scheme=Scheme(32)))
    one_block = quantize_layer(w, h, Recipe(method="gptq", scheme=Scheme(32), block_size=32))
    # block 128: groups 1-3 are fitted on partly updated weights, block 32: on fully updated ones
    # (fitting on the in-block weights would make the two agree up to float noise)
    assert torch.equal(r.qw.group_scale[:, 0], one_block.qw.group_scale[:, 0])
    assert (r.qw.group_scale[:, 1:4] != one_block.qw.group_scale[:, 1:4]).float().mean() > 0.3


def test_gar_order_keeps_groups():
    diag = torch.rand(200, generator=torch.Generator().manual_seed(0))
    perm = processing_order(diag, 32, "gar")
    assert sorted(perm.tolist()) == list(range(200))
    groups = (perm // 32).tolist()
    # each group's columns are contiguous in the processing order
    seen = []
    for grp in groups:
        if not seen or seen[-1] != grp:
            assert grp not in seen
            seen.append(grp)
    # groups sorted by their max diag, columns inside a group by diag, both descending
    gmax = [diag[perm[perm // 32 == grp]].max().item() for grp in seen]
    assert gmax == sorted(gmax, reverse=True)
    for grp in seen:
        d = diag[perm[perm // 32 == grp]]
        assert torch.equal(d, d.sort(descending=True).values)


def test_gar_permutation_is_undone():
    """With a diagonal Hessian GPTQ has no cross-column feedback, so any processing order must
    give the same codes: a wrong un-permutation would scramble them."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 96, generator=g)
    h = torch.diag(torch.rand(96, generator=g) + 0.1)
    for method in ("gptq", "dpq"):
        plain = quantize_layer(w, h, Recipe(method=method, scheme=Scheme(32), order="none"))
        gar = quantize_layer(w, h, Recipe(method=method, scheme=Scheme(32), order="gar"))
        act = quantize_layer(w, h, Recipe(method=method, scheme=Scheme(32), order="act"))
        assert torch.equal(plain.qw.q, gar.qw.q) and torch.equal(plain.qw.q, act.qw.q)
        assert torch.equal(plain.qw.group_scale, gar.qw.group_scale)


def test_gar_changes_result_with_correlations():
    w, x, h = correlated_layer(n=64, k=256)
    a = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32), order="none"))
    b = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32), order="gar"))
    assert not torch.equal(a.qw.q, b.qw.q)


def test_hessian_matches_direct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 40, generator=g)
    h, n = torch.zeros(40, 40), 0
    for chunk in x:  # streamed in batches
        h, n = hessian_update(h, n, chunk)
    flat = x.reshape(-1, 40)
    torch.testing.assert_close(h, 2 / flat.shape[0] * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    assert n == 150


def test_dead_column():
    w, _, h = correlated_layer(n=32, k=64)
    h[5, :] = 0
    h[:, 5] = 0
    res = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32)))
    assert (res.qw.q[:, 5] == 0).all() and torch.isfinite(res.w_eff).all()


def test_refit_scales_option():
    w, x, h = correlated_layer()
    fixed = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32)))
    refit = quantize_layer(w, h, Recipe(method="dpq", scheme=Scheme(32), refit_scales=True))
    assert not torch.equal(fixed.qw.group_scale, refit.qw.group_scale)
    assert torch.equal(refit.w_eff, refit.qw.dequantize(448.0))  # refitted scales are the stored ones
    with pytest.raises(ValueError, match="act-order"):
        Recipe(order="act", refit_scales=True)


def test_determinism_identical_bytes(tmp_path):
    from conftest import make_checkpoint

    digests = []
    for i in range(2):
        path, _ = make_checkpoint(tmp_path / f"run{i}", method="dpq")
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())})
    assert digests[0] == digests[1]


def test_calib_dtype_auto_follows_the_device(monkeypatch):
    from calibration.cli import resolve_calib_dtype

    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr("vllm_dpq.kernels.cpu.native_bf16", lambda v=native: v)
        assert resolve_calib_dtype("auto", "cpu") == want
    assert resolve_calib_dtype("auto", "cuda") == "bfloat16"
    assert resolve_calib_dtype("float16", "cpu") == "float16"  # an explicit choice is kept


# GPTQ variants whose column loops differ: refitted max / mse scales, fixed mse scales with GAR,
# act-order, the folded chain
LOOP_RECIPES = {
    "gptq": Recipe(method="gptq", scheme=Scheme(32)),
    "gptq-mse-refit": Recipe(method="gptq", scheme=Scheme(32), scale_search="mse"),
    "dpq-gar": Recipe(method="dpq", scheme=Scheme(32), order="gar"),
    "gptq-act": Recipe(method="gptq", scheme=Scheme(32), order="act"),
    "dpq-folded": Recipe(method="dpq", scheme=folded_scheme(), fold="vllm"),
}
# the Tensor methods that read values into Python: on an accelerator each waits for the device
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def count_host_reads(monkeypatch, fn) -> int:
    n = 0

    def counting(read):
        def counted(self, *args, **kwargs):
            nonlocal n
            n += 1
            return read(self, *args, **kwargs)
        return counted

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        fn()
    return n


@pytest.mark.parametrize("name", LOOP_RECIPES)
def test_gptq_reads_nothing_back_per_column(monkeypatch, name):
    """The GPTQ loop keeps its values on the layer's device: the Python-level reads of tensor
    values in one quantize_layer (the group structure, the loss at the end...) are as many at
    K=512 as at K=256, where one read per column would add 256. Reads inside torch's C++
    (boolean-mask indexing) are not seen here: test_gptq_on_cuda counts those."""
    recipe = LOOP_RECIPES[name]
    counts = []
    for k in (256, 512):
        w, _, h = correlated_layer(n=64, k=k, samples=1024)
        quantize_layer(w, h, recipe)  # first use fills caches (round_scale's bounds)
        counts.append(count_host_reads(monkeypatch, lambda: quantize_layer(w, h, recipe)))
    assert counts[0] == counts[1] <= 8, counts


def test_weight_and_hessian_on_different_devices_is_an_error():
    w, _, h = correlated_layer(n=16, k=64, samples=256)
    with pytest.raises(ValueError, match="one device.*cpu and meta"):
        quantize_layer(w, h.to("meta"), Recipe())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LOOP_RECIPES)
def test_gptq_on_cuda(name):
    """quantize_layer on CUDA tensors runs there (its results are CUDA tensors), is as good as
    on CPU, and CUDA's sync debug mode sees as many host syncs at K=512 as at K=256 (none per
    column). Max-scale RTN (element-wise ops and maxima only) is bit-identical to the CPU's."""
    recipe = LOOP_RECIPES[name]
    w, x, h = correlated_layer()
    cpu, dev = quantize_layer(w, h, recipe), quantize_layer(w.cuda(), h.cuda(), recipe)
    assert all(t.is_cuda for t in (dev.qw.q, dev.qw.group_scale, dev.qw.weight_scale, dev.w_eff))
    assert out_err(x, w, dev.w_eff.cpu()) < 1.03 * out_err(x, w, cpu.w_eff)
    rtn = Recipe(method="rtn", scheme=recipe.scheme, fold=recipe.fold, scale_search="max", codes="round")
    a, b = quantize_layer(w, None, rtn).qw, quantize_layer(w.cuda(), None, rtn).qw
    assert torch.equal(a.q, b.q.cpu()) and torch.equal(a.group_scale, b.group_scale.cpu())

    syncs = []
    for k in (256, 512):
        w, _, h = correlated_layer(n=64, k=k, samples=1024)
        w, h = w.cuda(), h.cuda()
        quantize_layer(w, h, recipe)  # warm-up (library initialisation, caches)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                quantize_layer(w, h, recipe)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(c.message) for c in caught))
    assert syncs[0] == syncs[1], syncs


def test_block_update_gemm_is_thread_count_invariant():
    """On CPU a large lazy block update ``err1 @ hinv[i1:i2, i2:]`` runs on all threads, the rest
    of the column loop on one: the codes equal a single-threaded loop's only because this fp32
    GEMM (sums of <= block_size products) gives the same bits at any thread count."""
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for n, b, rest in ((576, 128, 448), (1536, 128, 320), (576, 128, 1408), (200, 96, 77)):
        err1, hinv = torch.randn(n, b, generator=g), torch.randn(b + 30, rest + 50, generator=g)
        out = []
        for t in (1, max(threads, 2)):
            torch.set_num_threads(t)
            try:
                out.append(err1 @ hinv[30:, 50:])
            finally:
                torch.set_num_threads(threads)
        assert torch.equal(out[0], out[1]), (n, b, rest)
