"""Layer quantizers behind one interface: rtn, gptq (FP8-unaware), dpq; plus GAR / act-order.

    result = quantize_layer(W, H, recipe)     # W [N, K] fp32, H [K, K] (None for rtn)

``gptq`` and ``dpq`` share one GPTQ engine (OBS error feedback, lazy block updates); they
differ only in the quantizer ("chain") inside the loop:
  gptq: w -> s_w * q * s_g                      INT4 only; FP8 rounding left to inference
  dpq:  w -> s_w * fp8(clamp(q * s_g))          the whole INT4 -> FP8 chain (DPQ spec section 3)
Scale fitting is a per-method default (``METHOD_DEFAULTS``). dpq (and rtn): once, up front,
on the original weight (the paper's recipe). gptq: standard GPTQ (IST-DASLab gptq.py without
static_groups, AutoGPTQ, Intel Neural Compressor), i.e. ``refit_scales``: each group's scale
is fitted when the loop reaches the group, on the error-updated weight as gptq.py sees it
(``W[:, group]``: the state at the start of the current lazy-update block), with min-max
scales and rounded codes.

Length: the recipe, the chain quantizer and the one GPTQ engine (with its asymmetric-calibration
and tuning hooks) are one idea; the GPTAQ math is in calibration/asym.py, tuning in tune.py.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import torch

from calibration.asym import asym_term
from vllm_dpq.interop.fold import folded_scheme_problems
from vllm_dpq.numerics import (
    INT4_MAX, INT4_MIN, QuantizedWeight, Scheme, compute_weight_scale, expand_groups, fp8_round, group_view,
    max_group_scale, pack_result, quantize_codes, round_scale,
)

logger = logging.getLogger("calibration")

METHODS = ("rtn", "gptq", "dpq")
ORDERS = ("none", "gar", "act")
SCALE_SEARCHES = ("max", "mse")
CODES = ("round", "nearest")
EXPERT_ROUTING = ("routed", "all")
# mse scale search: candidate s_g / s_g(max), a coarse grid then +-0.04 around each group's best
# (Python floats holding fp32 values: no tensor, so nothing to move to the layer's device)
MSE_COARSE = (torch.arange(60, 106, 5).float() / 100).tolist()
MSE_FINE = torch.tensor([-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04]).tolist()
# the DPQ paper's recipe: its GPTQ (no group-aware reordering unless asked, no GPTAQ correction)
PAPER_RECIPE = dict(scale_search="max", codes="round", refit_scales=False, hessian_fp8=False, order="none",
                    asym=False, true_sequential=False)
# what a recipe field left at None means, per method. gptq: the standard GPTQ users know; dpq: the
# best recipe measured (docs/RESULTS.md, "Accuracy levers"): GAR and asymmetric calibration
METHOD_DEFAULTS = {
    "rtn": dict(order="none", asym=False, true_sequential=False, scale_search="mse", codes="nearest",
                refit_scales=False),
    "gptq": dict(order="none", asym=False, true_sequential=False, scale_search="max", codes="round",
                 refit_scales=True),
    "dpq": dict(order="gar", asym=True, true_sequential=False, scale_search="mse", codes="nearest",
                refit_scales=False),
}


@dataclass(frozen=True)
class Recipe:
    method: str = "dpq"
    scheme: Scheme = field(default_factory=Scheme)
    # None: the method's default (METHOD_DEFAULTS)
    order: str | None = None  # none | gar (group-aware reordering) | act (GPTQ act-order, fixed scales)
    damp: float = 0.01
    block_size: int = 128
    scale_search: str | None = None  # max: s_g = 2 max|W8|/15 (paper) | mse: best of a grid of shrinks
    codes: str | None = None  # round: q = round(w / s_g) (paper) | nearest: q minimising the chain error
    refit_scales: bool | None = None  # fit each group's scale as the loop reaches it (standard GPTQ)
    hessian_fp8: bool = False  # Hessian from FP8-quantized inputs (what inference sees)
    fold: str = "none"  # none | vllm: scales in stock vLLM's folded form (compressed-tensors export)
    # MoE (docs/ALGORITHMS.md, "Mixture of experts"): Hessians of routed experts from the tokens
    # routed to each ("routed") or from every token ("all"); an expert that saw fewer than
    # expert_min_tokens tokens is quantized by rtn and takes its static scale from its siblings
    experts: str = "routed"
    expert_min_tokens: int = 64
    # asymmetric calibration (GPTAQ / GPTQv2): also correct the difference between the
    # full-precision model's inputs and the quantized model's inputs, scaled by asym_alpha
    asym: bool | None = None
    asym_alpha: float = 0.25
    # GPTQ's true-sequential (and GPTAQ's own order): a decoder layer's Linears are quantized in the
    # order they run, each group sharing an input from inputs that went through the groups before
    # it quantized (calibration/pipeline.py); else all from one pass of the unquantized layer
    true_sequential: bool | None = None
    # block-wise tuning of rounding and group scales through the chain (calibration/tune.py): steps
    # of signed gradient descent per decoder layer after GPTQ (0: off)
    tune_steps: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, value in METHOD_DEFAULTS[self.method].items():  # order first: refit_scales depends on it
            if getattr(self, name) is None:  # act-order and the folded target need fixed scales
                fixed = name == "refit_scales" and (self.order == "act" or self.fold == "vllm")
                object.__setattr__(self, name, False if fixed else value)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {SCALE_SEARCHES}, got {self.scale_search!r}")
        if self.codes not in CODES:
            raise ValueError(f"codes must be one of {CODES}, got {self.codes!r}")
        if self.fold not in ("none", "vllm"):
            raise ValueError(f"fold must be 'none' or 'vllm', got {self.fold!r}")
        if self.fold == "vllm":
            problems = folded_scheme_problems(self.scheme) + (["no --refit-scales"] if self.refit_scales else [])
            if problems:
                raise ValueError("the compressed-tensors target needs: " + "; ".join(problems))
        if self.order == "act" and self.refit_scales:
            raise ValueError("act-order mixes groups, so scales cannot be refitted per group: drop one of the two")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.experts not in EXPERT_ROUTING:
            raise ValueError(f"experts must be one of {EXPERT_ROUTING}, got {self.experts!r}")
        if self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
        if self.asym and self.method == "rtn":
            raise ValueError("asymmetric calibration corrects GPTQ's updates: it needs --method gptq or dpq")
        if self.true_sequential and self.method == "rtn":
            raise ValueError("true-sequential orders GPTQ's Hessian passes: it needs --method gptq or dpq")
        if self.tune_steps and (self.method == "rtn" or self.fold != "none"):
            raise ValueError("tuning starts from GPTQ's result in the DPQ layout: it needs --method gptq or dpq "
                             "and --target dpq")
        if self.tune_steps < 0:
            raise ValueError(f"tune_steps must be >= 0, got {self.tune_steps}")
        if not 0 <= self.asym_alpha <= 1:
            raise ValueError(f"asym_alpha must be in [0, 1], got {self.asym_alpha}")

    @property
    def needs_hessian(self) -> bool:
        return self.method != "rtn"

    @property
    def fp8_aware(self) -> bool:
        return self.method != "gptq"

    def chain(self) -> "Chain":
        if self.fold == "vllm":
            from calibration.folded import FoldedChain  # imports this module

            return FoldedChain(self.scheme, self.fp8_aware, self.scale_search, self.codes)
        return Chain(self.scheme, self.fp8_aware, self.scale_search, self.codes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("scheme")
        return d


@dataclass
class LayerResult:
    qw: QuantizedWeight
    w_eff: torch.Tensor  # s_w * fp8(q * s_g): what inference computes with, fp32 (all methods)
    loss: float  # GPTQ's sum of squared, Hinv-weighted errors (0 for rtn)
    rounded: torch.Tensor | None = None  # GPTQ: the error-updated weight each code was chosen for (--tune)


class Chain:
    """Scale fitting and the in-loop quantizer of one layer.

    fp8_aware: the quantizer is the whole chain s_w * fp8(q * s_g) (rtn, dpq), else INT4 only
    (gptq). scale_search "mse" picks, per group, the shrink of the max-based scale that
    minimises the quantizer's diag(H)-weighted squared error; codes "nearest" picks among
    round(w / s_g) and its two neighbours the code whose chain output is closest to w (with
    FP8 rounding the chain's grid is not uniform, so plain rounding can miss the nearest point).
    """

    def __init__(self, scheme: Scheme, fp8_aware: bool, scale_search: str = "max", codes: str = "round"):
        self.scheme, self.fp8_aware = scheme, fp8_aware
        self.scale_search, self.nearest = scale_search, codes == "nearest" and fp8_aware

    def group_scale(self, w: torch.Tensor, s_w: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
        """Rounded s_g [N, G'] for groups w [N, G', g]; diag [G', g] weights the mse search."""
        s_max = max_group_scale(w, s_w, self.scheme.fp8_max, self.fp8_aware)
        rnd = lambda s: round_scale(s, self.scheme.scale_dtype, self.scheme.fp8_max)  # noqa: E731
        if self.scale_search == "max":
            return rnd(s_max)

        ws = w / s_w.reshape(-1, 1, 1)  # in units of s_w: one factor per row, same for every candidate
        one = s_max.new_ones(1)

        def error(shrink: torch.Tensor) -> torch.Tensor:  # lean: rounded codes, no neighbour search
            s = rnd(s_max * shrink)
            idx = torch.round(ws / s.unsqueeze(-1)).clamp_(-8, 7).long().add_(8)
            e = (ws - torch.gather(self.grid(one, s), -1, idx)).square_()
            return (e * diag if diag is not None else e).sum(-1)

        best = best_e = center = None
        for phase in (MSE_COARSE, MSE_FINE):  # a coarse grid, then around each group's best
            for c in phase:
                shrink = torch.full_like(s_max, c) if center is None else center + c
                e = error(shrink)
                better = torch.ones_like(e, dtype=torch.bool) if best is None else e < best_e
                best = shrink if best is None else torch.where(better, shrink, best)
                best_e = e if best_e is None else torch.where(better, e, best_e)
            center = best
        return rnd(s_max * best)

    def fit(self, w: torch.Tensor, diag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_w, s_g) of w [N, K]; diag(H) [K] weights the mse search."""
        g = self.scheme.group(w.shape[1])
        s_w = compute_weight_scale(w, self.scheme.weight_scale == "channel", self.scheme.fp8_max)
        return s_w, self.group_scale(group_view(w, g), s_w, None if diag is None else group_view(diag, g))

    def rtn(self, w: torch.Tensor) -> QuantizedWeight:
        """Fit the scales, then take each weight's code: the chain with no error feedback."""
        n, k = w.shape
        s_w, s_g = self.fit(w)
        q, _ = self(group_view(w, self.scheme.group(k)), s_w, s_g)
        return pack_result(q.reshape(n, -1)[:, :k].contiguous(), s_w, s_g, self.scheme)

    def grid(self, s_w: torch.Tensor, s_g: torch.Tensor) -> torch.Tensor:
        """The 16 values the quantizer can output for each scale: [*s_g.shape, 16], ascending."""
        codes = torch.arange(INT4_MIN, INT4_MAX + 1, dtype=torch.float32, device=s_g.device)
        prod = s_g.float().unsqueeze(-1) * codes
        if self.fp8_aware:
            prod = fp8_round(prod, self.scheme.fp8_max)
        return s_w.reshape(-1, *([1] * (s_g.ndim - 1)), 1) * prod

    def __call__(self, w: torch.Tensor, s_w: torch.Tensor, s_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, w_eff) of w [N, ..., c]: s_w [1] or [N]; s_g of shape w.shape[:-1] (one
        scale per row of the last dim). w_eff is exactly s_w * fp8(clamp(q * s_g))."""
        table = self.grid(s_w, s_g)
        idx = quantize_codes(w, s_w.reshape(-1, *([1] * (w.ndim - 1))), s_g.unsqueeze(-1)).long() + 8
        w_eff = torch.gather(table, -1, idx)
        if self.nearest:  # the FP8 grid is not uniform: the nearest value is round's code or a neighbour
            for step in (-1, 1):
                j = (idx + step).clamp(0, 15)
                v = torch.gather(table, -1, j)
                better = (w - v).abs() < (w - w_eff).abs()
                idx, w_eff = torch.where(better, j, idx), torch.where(better, v, w_eff)
        return (idx - 8).to(torch.int8), w_eff


def processing_order(diag: torch.Tensor, group: int, order: str) -> torch.Tensor:
    """Column permutation to run the GPTQ loop in.

    gar: inside each group, columns by diag(H) descending; whole groups by their max diag(H)
    descending. Columns never leave their group. act: all columns by diag(H) descending.
    """
    k = diag.numel()
    if order == "none":
        return torch.arange(k, device=diag.device)
    if order == "act":
        return torch.argsort(diag, descending=True, stable=True)
    groups = [torch.arange(s, min(s + group, k), device=diag.device) for s in range(0, k, group)]
    inner = [g[torch.argsort(diag[g], descending=True, stable=True)] for g in groups]
    gmax = torch.stack([diag[g].max() for g in groups])
    return torch.cat([inner[i] for i in torch.argsort(gmax, descending=True, stable=True).tolist()])


def prepare_hessian(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns (diag 0): H[d, d] = 1 and W[:, d] = 0; damping; returns (H, W) copies."""
    h, w = h.clone().float(), w.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    return h, w


def upper_cholesky_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping if H is not positive definite.
    (H^-1 = L^-T L^-1 by a triangular solve: torch.cholesky_inverse is ~20x slower on CPU.)"""
    extra = 0.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        try:
            l_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(h + extra * eye), eye, upper=False)
            return torch.linalg.cholesky(l_inv.t() @ l_inv, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-2 * torch.mean(torch.diag(h)).item())
            logger.warning("Hessian not positive definite: adding damping %.3g", extra)
    raise RuntimeError("Hessian is not positive definite even with extra damping")


def _blocks(perm_groups: list[int], block_size: int, group: int, k: int) -> list[tuple[int, int]]:
    """Split processing positions into blocks made of whole groups (when groups fit)."""
    if group > block_size:
        return [(s, min(s + block_size, k)) for s in range(0, k, block_size)]
    blocks, start, size = [], 0, 0
    for gsize in perm_groups:
        if size and size + gsize > block_size:
            blocks.append((start, start + size))
            start, size = start + size, 0
        size += gsize
    blocks.append((start, start + size))
    return blocks


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, recipe: Recipe, dxxt: torch.Tensor | None = None) -> LayerResult:
    """GPTQ with the recipe's chain as quantizer (DPQ spec section 3). Runs on the device of w
    and h; the column loop reads nothing back to the host (one read of the loss at the end).
    dxxt: GPTAQ's cross term (X_fp - X) X^T (``asym_update``), or None for plain GPTQ."""
    scheme = recipe.scheme
    n, k = w.shape
    g = scheme.group(k)
    chain = recipe.chain()
    if dxxt is not None:  # dead columns get no correction either
        dxxt = dxxt.float().masked_fill(torch.diag(h) == 0, 0)
    h, w = prepare_hessian(h, w, recipe.damp)
    diag = torch.diag(h)
    s_w, s_g = chain.fit(w, diag)  # once, up front, on the original (dead-masked) weight
    s_g_full = expand_groups(s_g, k, g)

    perm = processing_order(diag, g, recipe.order)
    inv = torch.argsort(perm)
    w, h, s_g_full, diag = w[:, perm].contiguous(), h[perm][:, perm], s_g_full[:, perm].contiguous(), diag[perm]
    hinv = upper_cholesky_inverse(h)
    p = None if dxxt is None else asym_term(dxxt[perm][:, perm], hinv, recipe.asym_alpha)
    # the group structure of the processing order, on the host (one read of perm per layer):
    # runs of consecutive positions from one original group, as (start, length, group)
    group_of = (perm.cpu() // g).tolist()
    runs = []
    for j, grp in enumerate(group_of):
        if runs and runs[-1][2] == grp:
            runs[-1][1] += 1
        else:
            runs.append([j, 1, grp])
    refit = recipe.refit_scales and recipe.order != "act"
    # act-order never refits; in the other orders each group is one run
    refits = {start: (size, grp) for start, size, grp in runs} if refit else {}

    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    rounded = torch.empty_like(w) if recipe.tune_steps else None
    loss = _gptq_loop(w, hinv, chain, s_w, s_g, s_g_full, codes, diag, refits,
                      _blocks([size for _, size, _ in runs], recipe.block_size, g, k), p, rounded)
    qw = pack_result(codes[:, inv].contiguous(), s_w, s_g, scheme)
    return LayerResult(qw, qw.dequantize(scheme.fp8_max), loss, None if rounded is None else rounded[:, inv])


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int):
    """torch's thread count set to n while inside, on CPU (elsewhere: nothing)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# multiply-adds from which a lazy block update runs on all threads: SmolLM2's largest is 1.1e8,
# where the per-column work dominates and switching thread counts per block cost more than it
# gained (measured on 2 cores); an 8192-wide layer's first blocks are ~1e10
THREADED_UPDATE = 2**30


def _gptq_loop(w, hinv, chain, s_w, s_g, s_g_full, codes, diag, refits, blocks, p=None, rounded=None) -> float:
    """The GPTQ column loop, in processing order; writes codes (and refitted scales) in place.

    p: GPTAQ's asymmetric term (``asym_term``): each column's pre-quantization value times its
    row of p is added to the later columns, in the block and in the lazy update alike (so the
    result does not depend on the block size). rounded: if given, receives each column as it was
    quantized (the error-updated weight).

    refits: {position: (group length, original group)} where a group's scale is refitted.
    On CPU the per-column operations (tiny: threads only add sync cost) run on one thread; a
    lazy block update ``w[:, i2:] -= err1 @ hinv[i1:i2, i2:]`` of THREADED_UPDATE multiply-adds
    or more on all of torch's threads (the same bits: MKL's GEMM of these shapes is
    thread-count invariant, tested)."""
    n, k = w.shape
    threads = torch.get_num_threads()
    col_loss = torch.empty(k, device=w.device)  # per column, read once at the end
    with cpu_threads(w.device, 1):
        for i1, i2 in blocks:
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            pre1 = None if p is None else torch.zeros_like(w1)  # columns before quantization
            for i in range(i2 - i1):
                j = i1 + i
                if j in refits:
                    # as gptq.py's find_params(W[:, j:j+g]): from w, not the in-block w1, i.e. the
                    # group's weights as they stood when the current block started
                    size, grp = refits[j]
                    cols = slice(j, j + size)
                    s = chain.group_scale(w[:, cols].unsqueeze(1), s_w, diag[cols].unsqueeze(0))  # [N, 1]
                    s_g_full[:, cols] = s
                    s_g[:, grp] = s.flatten()
                col = w1[:, i]
                q, col_eff = chain(col.unsqueeze(1), s_w, s_g_full[:, j])
                codes[:, j] = q.flatten()
                if rounded is not None:
                    rounded[:, j] = col
                d = hinv1[i, i]
                err = (col - col_eff.flatten()) / d
                col_loss[j] = (err**2).sum()
                if p is None:
                    w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                else:
                    pre1[:, i] = col
                    w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0) - col.unsqueeze(1) * p[j, i1 + i:i2]
                err1[:, i] = err
            big = n * (k - i2) * (i2 - i1) >= THREADED_UPDATE
            with cpu_threads(w.device, threads) if big else contextlib.nullcontext():
                w[:, i2:] -= err1 @ hinv[i1:i2, i2:] if p is None else err1 @ hinv[i1:i2, i2:] - pre1 @ p[i1:i2, i2:]
    return sum(col_loss.tolist()) / 2


def quantize_rtn(w: torch.Tensor, scheme: Scheme, scale_search: str = "max", codes: str = "round") -> QuantizedWeight:
    """The one RTN: the whole chain with no error feedback (``--method rtn``; max scales and
    rounded codes by default, i.e. DPQ spec section 2 as written)."""
    return quantize_layer(w, None, Recipe(method="rtn", scheme=scheme, scale_search=scale_search, codes=codes)).qw


def quantize_layer(w: torch.Tensor, h: torch.Tensor | None, recipe: Recipe,
                   dxxt: torch.Tensor | None = None) -> LayerResult:
    """Quantize one layer on the device of w (and h); the result's tensors stay there.
    dxxt: GPTAQ's cross term (``asym_update``; used by gptq and dpq, None: plain GPTQ)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    if recipe.method == "rtn":
        qw = recipe.chain().rtn(w.float())
        return LayerResult(qw, qw.dequantize(recipe.scheme.fp8_max), 0.0)
    if h is None:
        raise ValueError(f"method {recipe.method!r} needs a Hessian")
    if h.device != w.device:
        raise ValueError(f"weight and Hessian must be on one device (the one GPTQ runs on), got "
                         f"{w.device} and {h.device}")
    return gptq_quantize(w.float(), h, recipe, dxxt)


def hessian_update(h: torch.Tensor, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/n * sum(x x^T) over the rows of x [..., K]; returns (H, n)."""
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    h *= count / (count + m)
    x = x * (2 / (count + m)) ** 0.5
    h += x.t() @ x
    return h, count + m

