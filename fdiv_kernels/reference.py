"""fdpo_loss_reference: the pure-PyTorch f-DPO loss, eager and readable. It defines what is right.

It computes in float64 when given float64 inputs (that is how the tests use it) and in float32 otherwise,
and its gradient comes from autograd, independently of the kernels' hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import FDPOProblem, validate
from .divergences import psi, psi_diff, soft_clip
from .stats import FDPOStats


def _per_sample(x: torch.Tensor, p: FDPOProblem) -> torch.Tensor:
    """Expand a shared [B, ...] tensor (target or mask) to one row per sample."""
    if x.shape[0] == 2 * p.num_pairs:
        return x
    return x.repeat_interleave(2, dim=0) if p.interleaved else torch.cat([x, x])


def _split_pairs(x: torch.Tensor, p: FDPOProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample [2B] -> (winners [B], losers [B])."""
    return (x[0::2], x[1::2]) if p.interleaved else (x[: p.num_pairs], x[p.num_pairs :])


def _join_pairs(w: torch.Tensor, l: torch.Tensor, p: FDPOProblem) -> torch.Tensor:
    """(winners [B], losers [B]) -> per-sample [2B] in storage order."""
    return torch.stack([w, l], dim=1).flatten() if p.interleaved else torch.cat([w, l])


def denoising_errors(problem: FDPOProblem, dtype: torch.dtype):
    """Per-sample errors e, e_ref and e_ref - e (accumulated directly, SPEC section 2), in ``dtype``."""
    p = problem
    rows = 2 * p.num_pairs
    pred = p.model_pred.to(dtype).reshape(rows, -1)
    target = _per_sample(p.target, p).to(dtype).reshape(rows, -1)
    if p.mask is not None:
        mask = _per_sample(p.mask, p).to(dtype).reshape(rows, -1)
        count = mask.sum(dim=1)
    else:
        mask = None
        count = torch.full((rows,), pred.shape[1], dtype=dtype, device=pred.device)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        total = (x if mask is None else x * mask).sum(dim=1)
        if p.err_sum:
            return total
        return torch.where(count > 0, total / count.clamp_min(1e-30), torch.zeros_like(total))

    model_err = reduce((pred - target) ** 2)
    if p.ref_pred is not None:
        ref = p.ref_pred.to(dtype).reshape(rows, -1)
        ref_err = reduce((ref - target) ** 2)
        err_gap = reduce((ref - pred) * (ref + pred - 2 * target))  # e_ref - e without cancellation
    else:
        ref_err = p.ref_err.to(dtype)
        err_gap = ref_err - model_err
    return model_err, ref_err, err_gap


def fdpo_loss_reference(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    beta: float = 5000.0,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    pair_weight: torch.Tensor | None = None,
    err_reduction: str = "mean",
    mask: torch.Tensor | None = None,
    layout: str = "halves",
    beta_convention: str = "half",
    logratio_clip: float | None = None,
    reduction: str = "mean",
    implicit_acc_ties: str = "half",
    return_stats: bool = False,
):
    """The f-DPO loss of SPEC section 2 in plain PyTorch. Same arguments as :func:`fused_fdpo_loss`."""
    p = validate(
        model_pred, ref_pred, target, ref_err=ref_err, beta=beta, divergence=divergence, alpha=alpha,
        gamma=gamma, label_smoothing=label_smoothing, pair_weight=pair_weight, err_reduction=err_reduction,
        mask=mask, layout=layout, beta_convention=beta_convention, logratio_clip=logratio_clip,
        reduction=reduction, implicit_acc_ties=implicit_acc_ties,
    )
    dtype = torch.float64 if model_pred.dtype == torch.float64 else torch.float32
    model_err, ref_err_, err_gap = denoising_errors(p, dtype)

    gap_w, gap_l = _split_pairs(err_gap, p)
    weight = 1.0 if p.pair_weight is None else p.pair_weight.to(dtype)
    d_w = soft_clip(0.5 * p.beta * weight * gap_w, p.logratio_clip)
    d_l = soft_clip(0.5 * p.beta * weight * gap_l, p.logratio_clip)

    logits = p.gamma * psi_diff(p.divergence, d_w, d_l)
    eps = p.label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(logits)
    if eps > 0:
        losses = losses - eps * F.logsigmoid(-logits)
    loss = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[p.reduction]()
    if not return_stats:
        return loss
    logratio = _join_pairs(d_w, d_l, p)
    stats = FDPOStats.from_tensors(
        logits, model_err, ref_err_, logratio, psi(p.divergence, logratio), p.implicit_acc_ties
    )
    return loss, stats
