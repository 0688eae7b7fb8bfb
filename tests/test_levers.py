"""Accuracy levers of calibration (docs/ALGORITHMS.md, "Accuracy levers"): each changes only
what it claims, and lowers the error it targets on held-out inputs."""

import pytest
import torch

from calibration.algorithms import Recipe, hessian_update, quantize_layer
from calibration.asym import asym_update
from vllm_dpq.numerics import Scheme


def perturbed_inputs(samples, k=256, seed=0):
    """(x_fp, x_q): a layer's inputs in the full-precision model, and in a quantized model whose
    earlier layers distort them systematically (a fixed near-identity map) plus noise."""
    g = torch.Generator().manual_seed(seed)
    x_fp = (torch.randn(samples, 48, generator=g) @ torch.randn(48, k, generator=g)
            + 0.3 * torch.randn(samples, k, generator=g)) * torch.linspace(0.3, 2.0, k)
    distort = torch.eye(k) + 0.04 * torch.randn(k, k, generator=torch.Generator().manual_seed(99))
    return x_fp, x_fp @ distort + 0.02 * torch.randn(samples, k, generator=g)


def weight(n=128, k=256):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05


def fp_error(w, w_eff, x_fp, x_q):
    """Relative error of the quantized layer on the quantized model's inputs against the
    full-precision layer on the full-precision inputs (what the model's output sees)."""
    y = x_fp @ w.t()
    return ((x_q @ w_eff.t() - y).norm() / y.norm()).item()


def asym_stats(x_fp, x_q, chunks=4):
    k = x_q.shape[1]
    h, d, n = torch.zeros(k, k), torch.zeros(k, k), 0
    for a, b in zip(x_q.chunk(chunks), x_fp.chunk(chunks)):
        h, d, n = asym_update(h, d, n, a, b)
    return h, d


@pytest.mark.parametrize("method,group", [("dpq", 32), ("dpq", 128), ("gptq", 32)])
def test_asym_calib_lowers_held_out_error_against_full_precision(method, group):
    w = weight()
    x_fp, x_q = perturbed_inputs(2048)
    test_fp, test_q = perturbed_inputs(2048, seed=5)  # held out, same distortion
    h, d = asym_stats(x_fp, x_q)
    scheme = Scheme(group_size=group)
    plain = quantize_layer(w, h, Recipe(method=method, scheme=scheme))
    asym = quantize_layer(w, h, Recipe(method=method, scheme=scheme, asym=True), d)
    e_plain, e_asym = (fp_error(w, r.w_eff, test_fp, test_q) for r in (plain, asym))
    assert e_asym < 0.97 * e_plain, (e_plain, e_asym)
    assert int(asym.qw.q.min()) >= -8 and int(asym.qw.q.max()) <= 7


def test_asym_calib_without_perturbation_is_plain_dpq():
    w = weight()
    x_fp, _ = perturbed_inputs(1024)
    h, d = asym_stats(x_fp, x_fp)
    assert torch.equal(d, torch.zeros_like(d))
    h_plain, n = torch.zeros_like(h), 0
    for chunk in x_fp.chunk(4):
        h_plain, n = hessian_update(h_plain, n, chunk)
    assert torch.equal(h, h_plain)
    for order in ("none", "gar"):
        plain = quantize_layer(w, h, Recipe(scheme=Scheme(32), order=order))
        asym = quantize_layer(w, h, Recipe(scheme=Scheme(32), order=order, asym=True, asym_alpha=1.0), d)
        assert torch.equal(plain.qw.q, asym.qw.q) and torch.equal(plain.qw.group_scale, asym.qw.group_scale)


def test_asym_calib_does_not_depend_on_the_block_size():
    w = weight()
    h, d = asym_stats(*perturbed_inputs(1024))
    a = quantize_layer(w, h, Recipe(scheme=Scheme(32), asym=True), d)
    b = quantize_layer(w, h, Recipe(scheme=Scheme(32), asym=True, block_size=64), d)
    assert (a.qw.q != b.qw.q).float().mean() < 1e-3  # float reassociation only


def test_asym_calib_needs_a_gptq_method():
    with pytest.raises(ValueError, match="asymmetric calibration"):
        Recipe(method="rtn", asym=True)
    with pytest.raises(ValueError, match="asym_alpha"):
        Recipe(asym=True, asym_alpha=2.0)


def _calibrate_tiny(recipe, state=None, resume=False):
    from calibration.pipeline import calibrate
    from conftest import tiny_model

    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    result = calibrate(tiny_model(num_hidden_layers=3), ids, recipe, ["lm_head"], batch_size=4, progress=False,
                       state=state, resume=resume)
    return {n: result.layers[n].qw for n in result.layers}


def test_asym_calib_in_the_pipeline(tmp_path):
    """Layer 0 sees the embeddings in both models (no difference: plain DPQ bit for bit); later
    layers see the quantized predecessors and are corrected; an interrupted run resumes to the
    same codes (both input streams are committed)."""
    from calibration.resume import CalibrationState

    plain = _calibrate_tiny(Recipe(scheme=Scheme(32), asym=False))
    recipe = Recipe(scheme=Scheme(32), asym=True)
    asym = _calibrate_tiny(recipe)
    assert plain.keys() == asym.keys()
    for name in plain:
        same = torch.equal(plain[name].q, asym[name].q)
        assert same == name.startswith("model.layers.0."), name

    class Interrupt(Exception):
        pass

    class Stopping(CalibrationState):
        def commit(self, index, *args):
            super().commit(index, *args)
            if index == 1:
                raise Interrupt

    work = tmp_path / "work"
    with pytest.raises(Interrupt):
        _calibrate_tiny(recipe, Stopping(work, {"t": 1}))
    resumed = _calibrate_tiny(recipe, CalibrationState(work, {"t": 1}), resume=True)
    for name in asym:
        assert torch.equal(resumed[name].q, asym[name].q), name


def test_true_sequential_quantizes_each_group_from_inputs_through_the_quantized_ones():
    """q/k/v run first: the same codes as from one pass. o_proj's codes are exactly those of its
    Hessian recomputed from the model with q/k/v quantized (not from the unquantized attention).
    With --asym-calib the full-precision stream keeps the original q/k/v, so layer 0's o_proj
    gets a correction (without the swap both streams would be equal there, as in one pass)."""
    from conftest import tiny_model

    one = _calibrate_tiny(Recipe(scheme=Scheme(32), asym=False))
    seq = _calibrate_tiny(Recipe(scheme=Scheme(32), asym=False, true_sequential=True))
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    for name in one:
        assert torch.equal(one[name].q, seq[name].q) == (name in qkv), name

    model = tiny_model(num_hidden_layers=3)
    attn = model.model.layers[0].self_attn
    o_weight = attn.o_proj.weight.data.clone()
    for name in qkv:
        getattr(attn, name.rsplit(".", 1)[1]).weight.data = seq[name].dequantize(448.0)
    h, n = torch.zeros(128, 128), 0

    def grab(_mod, args):
        nonlocal h, n
        h, n = hessian_update(h, n, args[0])

    attn.o_proj.register_forward_pre_hook(grab)
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for batch in ids.split(4):
            model(batch)
    recipe = Recipe(scheme=Scheme(32), asym=False, true_sequential=True)
    expected = quantize_layer(o_weight, h, recipe).qw
    assert torch.equal(expected.q, seq["model.layers.0.self_attn.o_proj"].q)

    asym = _calibrate_tiny(Recipe(scheme=Scheme(32), true_sequential=True))
    assert all(torch.equal(asym[n].q, seq[n].q) for n in qkv)
    assert not torch.equal(asym["model.layers.0.self_attn.o_proj"].q, seq["model.layers.0.self_attn.o_proj"].q)
    with pytest.raises(ValueError, match="true-sequential"):
        Recipe(method="rtn", true_sequential=True)


class Block(torch.nn.Module):
    """A gated MLP with a residual, as in a decoder layer (calling convention: (hidden, **kwargs))."""

    def __init__(self, d=64, f=128):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.gate, self.up, self.down = (torch.nn.Linear(a, b, bias=False) for a, b in ((d, f), (d, f), (f, d)))
        for lin in (self.gate, self.up, self.down):
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def block_inputs(batches, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(7)) / 64**0.5
    return [(torch.randn(4, 256, 64, generator=g) @ mix) * torch.linspace(0.3, 2.0, 64) for _ in range(batches)]


def test_tune_never_worsens_the_calibration_loss_and_keeps_the_format():
    """What --tune guarantees today (docs/ALGORITHMS.md): the returned layer's loss against the
    full-precision block on the calibration batches is not above GPTQ's, and the result is a
    valid DPQ layer (codes in [-8, 7], scales in the stored dtype, the same s_w). It does NOT yet
    lower the held-out error reliably (docs/RESULTS.md, "Accuracy levers")."""
    import calibration.tune as tune
    from vllm_dpq.format import layer_tensors, validate_layer

    block, scheme = Block(), Scheme(32)
    train = block_inputs(8, 0)
    with torch.no_grad():
        targets = [block(x) for x in train]
    hs = {}
    for name in ("gate", "up", "down"):  # Hessians of each Linear's inputs in the block
        lin = getattr(block, name)

        def hook(_m, args, n=name):
            x = args[0]
            hs[n] = hessian_update(*hs.get(n, (torch.zeros(x.shape[-1], x.shape[-1]), 0)), x)
        handle = lin.register_forward_pre_hook(hook)
        with torch.no_grad():
            for x in train:
                block(x)
        handle.remove()
    res = {n: quantize_layer(getattr(block, n).weight.data, hs[n][0], Recipe(scheme=scheme, tune_steps=1))
           for n in ("gate", "up", "down")}
    gptq = {n: (n, r.qw, r.rounded) for n, r in res.items()}
    batches = [(x, {}) for x in train]

    def loss(qws):
        return tune._loss(block, {f"{n}.weight": qw.dequantize(scheme.fp8_max) for n, qw in qws.items()},
                          batches, targets)

    base = loss({n: qw for n, (_, qw, _) in gptq.items()})
    for lr in (0.0005, 0.02):  # a small step, and one large enough to make the raw result worse
        tuned = tune.tune_layer(block, gptq, batches, targets, scheme, steps=40, lr=lr)
        assert loss(tuned) <= base
        for n, qw in tuned.items():
            assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
            assert qw.group_scale.dtype == torch.bfloat16 and torch.equal(qw.weight_scale, gptq[n][1].weight_scale)
            lin = getattr(block, n)
            validate_layer(n, layer_tensors(n, qw, None), lin.out_features, lin.in_features, scheme)


def test_tune_with_zero_steps_is_gptq():
    from calibration.tune import TunedLinear

    w = weight()
    h, _ = asym_stats(*perturbed_inputs(512))
    qw = quantize_layer(w, h, Recipe(scheme=Scheme(32))).qw
    t = TunedLinear(qw, w, Scheme(32), 0.2)  # v = 0, a = 0: GPTQ's codes, scales and W_eff
    assert torch.equal(t.result().q, qw.q) and torch.equal(t.result().group_scale, qw.group_scale)
    assert torch.equal(t.w_eff().detach(), qw.dequantize(448.0))


def test_tune_in_the_pipeline():
    """--tune through the pipeline (with --asym-calib: against the full-precision stream): every
    Linear is still a valid DPQ layer, and nothing breaks the resume-free flow."""
    from vllm_dpq.format import layer_tensors, validate_layer

    for recipe in (Recipe(scheme=Scheme(32), tune_steps=3, asym=False), Recipe(scheme=Scheme(32), tune_steps=3)):
        for name, qw in _calibrate_tiny(recipe).items():
            n, k = qw.q.shape
            validate_layer(name, layer_tensors(name, qw, None), n, k, recipe.scheme)
    with pytest.raises(ValueError, match="tuning starts from GPTQ"):
        Recipe(method="rtn", tune_steps=10)
