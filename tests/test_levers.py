"""Accuracy levers of calibration (docs/ALGORITHMS.md, "Accuracy levers"): each changes only
what it claims, and lowers the error it targets on held-out inputs."""

import pytest
import torch

from calibration.algorithms import Recipe, asym_update, hessian_update, quantize_layer
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

    plain = _calibrate_tiny(Recipe(scheme=Scheme(32)))
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
