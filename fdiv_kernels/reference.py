"""fdpo_loss_reference: the pure-PyTorch f-DPO loss, eager and readable. It defines what is right.

It computes in float64 when given float64 inputs (that is how the tests use it) and in float32 otherwise.
Its gradient comes from autograd, independently of the kernels' hand-written backward, except for three pieces
differentiated by hand where autograd of the stable forward would lose the answer: the per-sample errors (mul0
semantics at overflow, where autograd of (ref - pred)(ref + pred - 2t) gives inf - inf), the soft clip (sech^2,
not 1 - tanh^2) and psi(clip(d_w)) - psi(clip(d_l)) (psi' and sech^2 themselves, not the backward of expm1, which
is 0 once k |d_w - d_l| > ~37; their product with beta/2 * w in log space where psi' alone overflows).

In float64, for |d| up to 1e4 and every divergence, each loss and gradient is within a few ulps of the exact
value, or, at ill-conditioned points (near-ties at large |d|), of the exact value at log-ratios a few ulps away
(tests/test_numerics.py checks it against mpmath). Gradients are +-inf exactly where the per-sample coefficient
dloss/d(e_ref - e) overflows; the loss is +inf where the logit overflows (as in the kernels). A NaN mask entry
makes that sample's errors and its pair's loss NaN, as in the kernels. The backward is differentiable: double
backward (gradgradcheck) works, e.g. for gradient penalties, which the fused backends refuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._validation import FDPOProblem, validate
from .backends.common import accumulate_dtype
from .divergences import _mul0_diff, clipped_psi_diff, psi, row_errors, soft_clip
from .options import with_options
from .stats import FDPOStats


def _per_sample(x: torch.Tensor, p: FDPOProblem) -> torch.Tensor:
    """Expand a shared [B, ...] tensor (target or mask) to one row per sample."""
    if x.shape[0] == 2 * p.num_pairs:
        return x
    return x.repeat_interleave(2, dim=0) if p.config.interleaved else torch.cat([x, x])


def _split_pairs(x: torch.Tensor, p: FDPOProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [2B] -> (winners [B], losers [B])."""
    return (x[0::2], x[1::2]) if p.config.interleaved else (x[: p.num_pairs], x[p.num_pairs :])


def _join_pairs(w: torch.Tensor, l: torch.Tensor, p: FDPOProblem) -> torch.Tensor:
    """(winners [B], losers [B]) -> per-sample [2B] in storage order."""
    return torch.stack([w, l], dim=1).flatten() if p.config.interleaved else torch.cat([w, l])


class _RowErrors(torch.autograd.Function):
    """Per-sample (e, e_ref, e_ref - e) from [rows, D] tensors; differentiable in model_pred only (validation
    refuses ref_pred, target, ref_err and mask that require grad).

    d e / d pred = -d (e_ref - e) / d pred = 2 (pred - t) m inv, applied with mul0 semantics: an overflowed
    (+-inf) row coefficient times a zero residual or mask weight is 0, as in every kernel (autograd of the
    direct form (ref - pred)(ref + pred - 2t) would give inf - inf = NaN there, and inf * 0 = NaN at m = 0).
    The backward is itself differentiable (double backward).
    """

    @staticmethod
    def forward(ctx, pred, ref, target, mask, ref_err, err_reduction: str):
        model_err, ref_err_, err_gap, inv = row_errors(pred, ref, target, mask, ref_err, err_reduction)
        ctx.save_for_backward(pred, target, mask, inv)
        return model_err, ref_err_, err_gap

    @staticmethod
    def backward(ctx, grad_err, _grad_ref_err, grad_gap):
        pred, target, mask, inv = ctx.saved_tensors
        row = _mul0_diff(grad_err - grad_gap, 2.0 * inv)
        grad = _mul0_diff(row[:, None], pred - target)
        if mask is not None:
            grad = _mul0_diff(grad, mask)
        return grad, None, None, None, None, None


def denoising_errors(problem: FDPOProblem, dtype: torch.dtype):
    """Per-sample errors e, e_ref and e_ref - e (accumulated directly, spec §2 (docs/spec.md)), in ``dtype``."""
    p = problem
    rows = 2 * p.num_pairs
    pred = p.model_pred.to(dtype).reshape(rows, -1)
    target = _per_sample(p.target, p).to(dtype).reshape(rows, -1)
    mask = None if p.mask is None else _per_sample(p.mask, p).to(dtype).reshape(rows, -1)
    ref = None if p.ref_pred is None else p.ref_pred.to(dtype).reshape(rows, -1)
    ref_err = None if p.ref_err is None else p.ref_err.to(dtype)
    return _RowErrors.apply(pred, ref, target, mask, ref_err, p.config.err_reduction)


@with_options
def fdpo_loss_reference(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    **options,
):
    """The f-DPO loss of docs/spec.md in plain PyTorch. Same arguments as :func:`fused_fdpo_loss` (no ``backend``).

    Args:
        model_pred, ref_pred, target, ref_err, mask, pair_weight: as in :func:`fused_fdpo_loss`.
        {options}
        return_stats: also return :class:`FDPOStats`.
    """
    p = validate(model_pred, ref_pred, target, ref_err=ref_err, mask=mask, pair_weight=pair_weight, **options)
    c = p.config
    dtype = accumulate_dtype(model_pred.dtype)
    if c.loss_type == "mapo":
        return _mapo_reference(p, dtype, return_stats)
    model_err, ref_err_, err_gap = denoising_errors(p, dtype)

    gap_w, gap_l = _split_pairs(err_gap, p)
    if c.sdpo_mu is not None:  # the losers' gradient times lambda; the value unchanged
        lam = _sdpo_lambda_reference(p, dtype)
        gap_l = gap_l.detach() + lam * (gap_l - gap_l.detach())
    weight = 1.0 if p.pair_weight is None else p.pair_weight.to(dtype)
    scale = 0.5 * c.beta * weight  # d = scale * (e_ref - e), then the soft clip
    # psi(clip(d_w)) - psi(clip(d_l)), differentiated through psi' and sech^2 evaluated directly (divergences.py),
    # times the scale in one log-space product: autograd of the stable forms would cancel (expm1's backward,
    # 1 - tanh^2) or give inf * 0 at overflow, and psi' alone may overflow where dloss/d(e_ref - e) does not.
    logits = c.gamma * clipped_psi_diff(c.divergence, gap_w, gap_l, c.logratio_clip, scale=scale)
    # The pair loss, written independently of the kernels' link_loss (backends/torch_backend.py, which also returns
    # its hand-written derivative): here autograd differentiates it, so the two check each other.
    if c.loss_type == "hinge":  # diffusers' --loss_type hinge
        losses = torch.relu(1.0 - logits)
    elif c.loss_type == "ipo":  # (z - 1 / (2 tau))^2
        losses = (logits - c.ipo_margin) ** 2
    elif c.loss_type == "dmpo":  # KL(p || q), p = sigmoid(z), q = 1 - dmpo_alpha (Diffusion-SDPO's DMPO)
        # p and 1 - p as exp(logsigmoid(+-z)): autograd of sigmoid(-z) would be y (1 - y) = 0 once y rounds to 1
        log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        assert c.dmpo_alpha is not None  # validate() requires it for dmpo
        log_q, log_1mq = math.log1p(-c.dmpo_alpha), math.log(c.dmpo_alpha)
        losses = torch.exp(log_p) * (log_p - log_q) + torch.exp(log_1mp) * (log_1mp - log_1mq)
    else:
        eps = c.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(logits)
        if eps > 0:
            losses = losses - eps * F.logsigmoid(-logits)
    reduce: dict[str, Callable[[], torch.Tensor]] = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}
    loss = reduce[c.reduction]()
    if not return_stats:
        return loss
    logratio = soft_clip(_join_pairs(scale * gap_w, scale * gap_l, p).detach(), c.logratio_clip)
    stats = FDPOStats.from_tensors(
        logits, model_err, ref_err_, logratio, psi(c.divergence, logratio), c.implicit_acc_ties
    )
    if c.sdpo_mu is not None:
        stats.extra = {"sdpo_lambda": lam}
    return loss, stats


def _sdpo_lambda_reference(p: FDPOProblem, dtype: torch.dtype) -> torch.Tensor:
    """Diffusion-SDPO's lambda as its authors compute it (AIDC-AI/Diffusion-SDPO@84fb241:train.py:84-124): the
    gradients of the batch-mean winner and loser squared errors by autograd, then clamp((1 - mu) |g_A|^2 /
    (g_B . g_A + 1e-9), 0, 1) where g_B . g_A > 0, else 1."""
    rows = 2 * p.num_pairs
    pred = p.model_pred.detach().to(dtype).reshape(rows, -1)
    target = _per_sample(p.target, p).to(dtype).reshape(rows, -1)
    pred_w, pred_l = (t.clone().requires_grad_(True) for t in _split_pairs(pred, p))
    target_w, target_l = _split_pairs(target, p)
    with torch.enable_grad():
        g_a = torch.autograd.grad(((pred_w - target_w) ** 2).mean(), pred_w)[0]
        g_b = torch.autograd.grad(((pred_l - target_l) ** 2).mean(), pred_l)[0]
    num, den = (g_a * g_a).sum(), (g_b * g_a).sum()
    assert p.config.sdpo_mu is not None
    lam = torch.where(den > 0, (1.0 - p.config.sdpo_mu) * num / (den + 1e-9), torch.ones_like(den))
    return lam.clamp(0.0, 1.0).detach()


def _mapo_phi_reference(x: torch.Tensor) -> torch.Tensor:
    """x / (e^x - 1) by autograd, written as |x| q(|x|) - min(x, 0), q(a) = e^-a / (1 - e^-a) = 1 / (e^a - 1): no
    overflow, so its autograd derivative is right past exp's range (x / expm1(x) gave phi' = 1 / expm1(x) once
    expm1(x)^2 overflowed, then NaN). Float64: the derivative's cancellation costs ~4 eps / |x| near 0, so below
    |x| = 1e-2 the series 1 - x/2 + x^2/12 - x^4/720 + x^6/30240 (remainder < 1e-22)."""
    small = x.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(x), x)
    a = safe.abs()
    direct = a * (torch.exp(-a) / -torch.expm1(-a)) - safe.clamp_max(0.0)
    u = x * x
    series = 1.0 - x / 2 + u * (1.0 / 12 + u * (-1.0 / 720 + u / 30240))
    return torch.where(small, series, direct)


def _mapo_reference(p: FDPOProblem, dtype: torch.dtype, return_stats: bool):
    """MaPO (mapo-t2i/mapo@374b3d3:utils.py:286-301): mean over pairs of e_w - beta * log sigmoid(T (phi(s e_w) -
    phi(s e_l))), e the (masked) mean squared error, no reference."""
    c = p.config
    rows = 2 * p.num_pairs
    pred = p.model_pred.to(dtype).reshape(rows, -1)
    target = _per_sample(p.target, p).to(dtype).reshape(rows, -1)
    mask = None if p.mask is None else _per_sample(p.mask, p).to(dtype).reshape(rows, -1)
    zeros = torch.zeros(rows, dtype=dtype, device=pred.device)
    model_err = _RowErrors.apply(pred, None, target, mask, zeros, c.err_reduction)[0]
    x = c.mapo_snr * model_err
    score = _mapo_phi_reference(x)
    score_w, score_l = _split_pairs(score, p)
    logits = c.mapo_timesteps * (score_w - score_l)
    losses = _split_pairs(model_err, p)[0] - c.beta * F.logsigmoid(logits)
    reduce: dict[str, Callable[[], torch.Tensor]] = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}
    loss = reduce[c.reduction]()
    if not return_stats:
        return loss
    return loss, FDPOStats.from_tensors(logits, model_err, zeros, x.detach(), score.detach(), c.implicit_acc_ties)


def kto_loss_reference(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    labels: torch.Tensor,
    ref_err: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    kl_all_reduce: bool = False,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    return_stats: bool = False,
    **options,
):
    """Diffusion-KTO (:func:`fdiv_kernels.fused_kto_loss`) in plain PyTorch, any number of rows N (no ``backend``)."""
    # The argument checks and the reference point (plumbing: validation, the all-reduce) are shared with the fused
    # call; the head below is written independently of heads.kto_head.
    from .heads import KTO_OPTIONS, _check_kto, kto_reference_point

    for name in options:
        if name not in KTO_OPTIONS:
            raise TypeError(
                f"kto_loss_reference got an unexpected option {name!r}; its options are {list(KTO_OPTIONS)}"
            )
    weights = {"desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    labels = _check_kto(model_pred, target, mask, labels, kl, weights, fused=False)
    n = model_pred.shape[0]

    def rows_even(t):  # validate() checks the tensors as a paired batch: an odd N is checked with its last row twice
        return t if t is None or n % 2 == 0 else torch.cat([t, t[-1:]])

    config = validate(
        rows_even(model_pred),
        rows_even(ref_pred),
        rows_even(target),
        ref_err=rows_even(ref_err),
        mask=rows_even(mask),
        pair_weight=None,
        **options,
    ).config
    dtype = accumulate_dtype(model_pred.dtype)
    pred = model_pred.to(dtype).reshape(n, -1)
    ref = None if ref_pred is None else ref_pred.to(dtype).reshape(n, -1)
    assert target is not None  # validate() requires it
    tgt = target.to(dtype).reshape(n, -1)
    msk = None if mask is None else mask.to(dtype).reshape(n, -1)
    ref_e = None if ref_err is None else ref_err.to(dtype)
    model_err, ref_err_, err_gap = _RowErrors.apply(pred, ref, tgt, msk, ref_e, config.err_reduction)
    kl_point = kto_reference_point(err_gap, kl, kl_all_reduce)
    scale = 0.5 * config.beta  # d = beta/2 (e_ref - e), d_KL = beta/2 KL, as the authors' beta (e_ref - e - KL)
    z = config.gamma * clipped_psi_diff(
        config.divergence, err_gap, kl_point.expand_as(err_gap), config.logratio_clip, scale=scale
    )
    # The authors' w_y (1 - sigmoid(+-z)) as w_y sigmoid(-+z) (no 1 - h cancellation), the two kinds of row as
    # two branches
    losses = torch.where(
        labels, float(desirable_weight) * torch.sigmoid(-z), float(undesirable_weight) * torch.sigmoid(z)
    )
    logits = torch.where(labels, z, -z)
    reduce: dict[str, Callable[[], torch.Tensor]] = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}
    loss = reduce[config.reduction]()
    if not return_stats:
        return loss
    logratio = soft_clip(scale * err_gap.detach(), config.logratio_clip)
    stats = FDPOStats.from_tensors(
        logits, model_err, ref_err_, logratio, psi(config.divergence, logratio), config.implicit_acc_ties
    )
    stats.extra = {"kl": kl_point}
    return loss, stats
