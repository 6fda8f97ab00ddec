"""Preference losses whose head runs on the fused kernels' per-sample errors: Diffusion-KTO and the Diffusion-SDPO
safeguard (MaPO's pair head runs in the kernels' epilogue: loss_type="mapo", csrc/fdpo_math.h mapo_pair_head).

The data passes are fused_fdpo_loss's own, on every backend: the dispatched op's forward reads each row once and
returns the per-sample errors (``e``, ``e_ref`` and ``e_ref - e`` accumulated directly), and its backward writes
the gradient in one elementwise pass, ``grad = c_i * mask * (pred - target)``. Only the head between them differs:
here it is PyTorch on ``[2B]``-sized tensors, differentiated by autograd in the per-sample errors
(:class:`_SampleErrors` turns ``dL/de_i`` into the backward pass's ``c_i``), where the kernels' built-in heads
(sigmoid, hinge, ipo, dmpo, mapo) are evaluated in-register in the forward's epilogue. A few launches on ``B`` numbers
each, independent of the sample size. A new head of this shape is a function of ``(e, e_ref, e_ref - e)``.

The float64 reference of each head is written independently in reference.py; tests/test_heads.py checks both
against the authors' formulas.
"""

from __future__ import annotations

import torch

from ._validation import FDPOConfig, check_inputs, config_for
from .backends.common import accumulate_dtype
from .divergences import clipped_psi_diff, psi, soft_clip
from .ops import backward_op_for, dispatch
from .stats import FDPOStats

# ---------------------------------------------------------------------------------------------------------------
# The differentiable per-sample errors on the fused passes.
# ---------------------------------------------------------------------------------------------------------------


def _errors_config(config: FDPOConfig) -> FDPOConfig:
    """The op configuration whose statistics are the plain per-sample errors: beta = 2 ("half") makes
    ``d = e_ref - e`` exactly, reduction "none" skips the loss reduction; the user's error reduction and layout."""
    return config_for(
        {"beta": 2.0, "reduction": "none", "err_reduction": config.err_reduction, "layout": config.layout}
    )


def _row_inv(model_pred: torch.Tensor, mask: torch.Tensor | None, config: FDPOConfig) -> torch.Tensor:
    """Per row, d e / d (pred - target)^2 summed: 1/D, 1/(sum of the row's mask; 0 for an empty one) or 1, as the
    kernels' ``inv`` (divergences.row_errors is the reference's twin)."""
    rows = model_pred.shape[0]
    acc = accumulate_dtype(model_pred.dtype)
    if config.err_reduction == "sum":
        return torch.ones(rows, dtype=acc, device=model_pred.device)
    if mask is None or config.err_reduction == "mean_all":
        return torch.full((rows,), 1.0 / (model_pred.numel() // rows), dtype=acc, device=model_pred.device)
    count = mask.reshape(mask.shape[0], -1).sum(dim=1, dtype=acc)
    if count.shape[0] != rows:  # one mask shared by the two samples of each pair
        count = count.repeat_interleave(2) if config.interleaved else torch.cat([count, count])
    return torch.where(count > 0, 1.0 / count.clamp_min(1e-30), torch.zeros_like(count))


class _SampleErrors(torch.autograd.Function):
    """``[4, rows]`` statistics of the fused forward (rows: e, e_ref, e_ref - e, and an unused fourth), differentiable
    in model_pred through rows 0 and 2: the backward is the fused backward pass with ``c_i = 2 inv_i (dL/de_i -
    dL/d(e_ref - e)_i)``. The op runs below autograd; validation has refused reference, target and mask tensors
    that require grad."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, ref_err, mask, config: FDPOConfig, backend: str):
        name, op = dispatch(backend, model_pred.device)
        fparams, iparams = _errors_config(config).op_scalars()
        stats = op(model_pred, ref_pred, target, ref_err, mask, None, fparams, iparams)[2]
        ctx.save_for_backward(model_pred, target, mask, _row_inv(model_pred, mask, config))
        ctx.backward_op = backward_op_for(name, model_pred.device.type)
        ctx.interleaved = config.interleaved
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        model_pred, target, mask, inv = ctx.saved_tensors
        coef = (2.0 * inv) * (grad_stats[0] - grad_stats[2])
        unit = torch.ones((), dtype=coef.dtype, device=coef.device)
        grad = ctx.backward_op(unit, model_pred, target, mask, coef.contiguous(), ctx.interleaved)
        return grad, None, None, None, None, None, None


def sample_errors(model_pred, ref_pred, target, ref_err, mask, config: FDPOConfig, backend: str):
    """(e, e_ref, e_ref - e) per row on the fused passes; e and e_ref - e carry model_pred's gradient."""
    stats = _SampleErrors.apply(model_pred, ref_pred, target, ref_err, mask, config, backend)
    return stats[0], stats[1].detach(), stats[2]


def _split(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [2B] (or [2B, ...]) -> winners, losers."""
    half = x.shape[0] // 2
    return (x[0::2], x[1::2]) if interleaved else (x[:half], x[half:])


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    return losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-SDPO's winner-preserving safeguard (AIDC-AI/Diffusion-SDPO@84fb241:train.py:84-124, 1196-1202).
# ---------------------------------------------------------------------------------------------------------------

_SDPO_EPS = 1e-9  # added to g_l . g_w, as the authors' get_adaptive_lose_l_scale


def sdpo_lambda(
    sample_stats: torch.Tensor, summary: torch.Tensor, model_pred: torch.Tensor, config: FDPOConfig
) -> torch.Tensor:
    """lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w + 1e-9), 0, 1) where g_l . g_w > 0, else 1; g = 2 r / n, the
    gradients of the batch-mean squared errors of the winners and of the losers (n = B * D elements each), on the
    device, no host sync, from the fused forward's own outputs (no extra pass over the data): |g_w|^2 from the
    winners' errors (unmasked: sum r_w^2 = e_w / inv, inv = 1/D for err_reduction "mean" / "mean_all", 1 for
    "sum"), g_l . g_w from summary[3], the cross term X = sum r_w . r_l the forward reduces with cross_term (set
    by the config for sdpo_mu)."""
    rows = model_pred.shape[0]
    per_row = model_pred.numel() // rows
    e_w, _ = _split(sample_stats[0], config.interleaved)
    squares_per_error = 1.0 if config.err_reduction == "sum" else float(per_row)  # 1 / inv
    scale = (2.0 / ((rows // 2) * per_row)) ** 2
    num = scale * (squares_per_error * e_w.sum())
    den = scale * summary[3]
    assert config.sdpo_mu is not None
    cap = (1.0 - config.sdpo_mu) * num / (den + _SDPO_EPS)
    return torch.where(den > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


class _WinnerPreserving(torch.autograd.Function):
    """The fused op's forward unchanged; its backward with the losers' coefficients times lambda (the loss value
    of ``sg(e_l) + lambda (e_l - sg(e_l))`` is that of e_l)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, ref_err, pair_weight, config: FDPOConfig, backend: str):
        name, op = dispatch(backend, model_pred.device)
        loss, logits, stats, summary, coef = op(
            model_pred, ref_pred, target, ref_err, None, pair_weight, *config.op_scalars()
        )
        lam = sdpo_lambda(stats, summary, model_pred, config)
        is_loser = torch.zeros_like(coef, dtype=torch.bool)
        _split(is_loser, config.interleaved)[1].fill_(True)
        ctx.save_for_backward(model_pred, target, torch.where(is_loser, coef * lam, coef))
        ctx.backward_op = backward_op_for(name, model_pred.device.type)
        ctx.interleaved = config.interleaved
        ctx.mark_non_differentiable(logits, stats, summary, lam)
        ctx.set_materialize_grads(False)
        return loss, logits, stats, summary, lam

    @staticmethod
    def backward(ctx, grad_loss, *_stat_grads):
        grad = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            model_pred, target, coef = ctx.saved_tensors
            grad = ctx.backward_op(grad_loss.contiguous(), model_pred, target, None, coef, ctx.interleaved)
        return grad, None, None, None, None, None, None


def sdpo_loss(model_pred, ref_pred, target, ref_err, pair_weight, config: FDPOConfig, backend: str, return_stats):
    loss, logits, stats, summary, lam = _WinnerPreserving.apply(
        model_pred, ref_pred, target, ref_err, pair_weight, config, backend
    )
    if not return_stats:
        return loss
    out = FDPOStats.from_kernel(logits, stats, summary)
    out.extra = {"sdpo_lambda": lam}
    return loss, out


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-KTO (jacklishufan/diffusion-kto@226bbd0:train_kto_sd_v1.5.py:1451-1483): unpaired rows with labels.
# ---------------------------------------------------------------------------------------------------------------

KTO_OPTIONS = (
    "beta",
    "beta_convention",
    "divergence",
    "alpha",
    "gamma",
    "err_reduction",
    "logratio_clip",
    "reduction",
    "implicit_acc_ties",
)


def _check_kto(model_pred, target, mask, labels, kl, weights: dict, fused: bool = True) -> torch.Tensor:
    """The unpaired side of KTO's arguments (check_inputs then checks the tensors as rows of the op); the labels
    as a bool [N]. ``fused``: the kernels' even number of rows."""
    if not isinstance(model_pred, torch.Tensor):
        raise TypeError(f"model_pred must be a torch.Tensor; got {type(model_pred).__name__}")
    n = model_pred.shape[0] if model_pred.dim() else 0
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"labels must be a torch.Tensor [N] of desirable (True/1) / undesirable (False/0) flags, one per row of "
            f"model_pred; got {type(labels).__name__}"
        )
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [N] = ({n},), one per row of model_pred; got {tuple(labels.shape)}")
    if labels.device != model_pred.device:
        raise ValueError(f"labels is on {labels.device} but model_pred is on {model_pred.device}")
    if labels.dtype != torch.bool:  # bool labels need no check (and no host sync)
        if labels.is_floating_point() or labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels must be bool, or integers 0 (undesirable) and 1 (desirable)")
        labels = labels.bool()
    if n == 0 or (fused and n % 2):
        raise ValueError(
            f"model_pred has {n} rows; the fused kernels read rows two at a time, so fused_kto_loss needs an even, "
            "non-zero number of rows (kto_loss_reference takes any N)"
        )
    for name, t in (("target", target), ("mask", mask)):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] != n:
            raise ValueError(f"{name} must have one row per sample, [N, ...] with N = {n}; got {tuple(t.shape)}")
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or not (0.0 <= float(value) < float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0 (KTO's lambda_d / lambda_u); got {value!r}")
    if kl is not None and not (isinstance(kl, (int, float)) or (isinstance(kl, torch.Tensor) and kl.numel() == 1)):
        raise TypeError(f"kl must be a number or a one-element tensor (the batch's mean log-ratio); got {kl!r}")
    return labels


def kto_reference_point(diff: torch.Tensor, kl, all_reduce: bool) -> torch.Tensor:
    """KTO's detached reference point max(0, KL), KL = the batch mean of e_ref - e: the caller's ``kl``, or this
    call's mean, averaged over processes when ``all_reduce`` (never silently per process: with several processes
    and neither, it raises)."""
    if kl is not None:
        value = torch.as_tensor(kl, dtype=diff.dtype, device=diff.device).reshape(())
        return value.detach().clamp(min=0.0)
    value = diff.detach().mean()
    dist = torch.distributed
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if several and not all_reduce:
        raise ValueError(
            "fused_kto_loss under torch.distributed with several processes: KTO's reference point is the mean "
            "log-ratio of the whole batch; pass kl_all_reduce=True (all-reduced here) or kl= (computed by you)"
        )
    if several:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / dist.get_world_size()
    return value.clamp(min=0.0)


def kto_head(diff, labels, kl_point, config: FDPOConfig, weights: tuple[float, float]):
    """Per-row KTO loss w_y (1 - sigmoid(z_y)), z_y = +-gamma (psi(d) - psi(d_KL)), d = beta/2 (e_ref - e) (both
    through the clip), and the logits z_y. reverse_kl: z_y = +-beta/2 (e_ref - e - KL), the authors' formula."""
    scale = 0.5 * config.beta
    margin = clipped_psi_diff(config.divergence, diff, kl_point.expand_as(diff), config.logratio_clip, scale=scale)
    sign = torch.where(labels, 1.0, -1.0).to(diff.dtype)
    logits = config.gamma * sign * margin
    # the weights in the head's dtype (torch.where of Python floats would round them to float32 first)
    weight = torch.where(labels, diff.new_tensor(weights[0]), diff.new_tensor(weights[1]))
    return weight * torch.sigmoid(-logits), logits


def kto_stats(logits, e, e_ref, diff, kl_point, config: FDPOConfig) -> FDPOStats:
    logratio = soft_clip(0.5 * config.beta * diff.detach(), config.logratio_clip)
    stats = FDPOStats.from_tensors(
        logits, e, e_ref, logratio, psi(config.divergence, logratio), config.implicit_acc_ties
    )
    stats.extra = {"kl": kl_point}
    return stats


def fused_kto_loss(
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
    backend: str = "auto",
    **options,
):
    """Diffusion-KTO on the fused passes: unpaired rows, each desirable or not.

    ``loss_i = w_y (1 - sigmoid(z_i))``, ``z_i = +-gamma (psi(d_i) - psi(d_KL))`` (+ for desirable rows),
    ``d_i = beta/2 (e_ref_i - e_i)`` (``beta_convention="full"``: ``beta (e_ref_i - e_i)``, the authors'
    ``beta_dpo``), ``d_KL`` the same of the detached reference point ``max(0, KL)``. With ``divergence="reverse_kl"``
    this is jacklishufan/diffusion-kto's loss (``--halo sigmoid``, ``--bce_offset none``).

    Args:
        model_pred: policy predictions ``[N, *S]`` (any order of desirable and undesirable rows; N even).
        ref_pred, ref_err: reference predictions ``[N, *S]`` or cached reference errors ``[N]`` (exactly one).
        target: ``[N, *S]``. mask: per-element weights ``[N, *S]``.
        labels: ``[N]``: True (or 1) desirable, False (or 0) undesirable. Bool labels cost no check.
        kl: the reference point's KL, the mean of ``e_ref - e`` over the global batch, already all-reduced by the
            caller; None: computed from this call's rows (detached).
        kl_all_reduce: with ``kl=None`` under ``torch.distributed``, average KL over processes (an all-reduce of
            one number, as the authors' ``accelerator.reduce``); several processes without it (or ``kl``) raise.
        desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
        beta, beta_convention, divergence, alpha, gamma, err_reduction, logratio_clip, reduction (over the N rows),
            implicit_acc_ties: as in :func:`fused_fdpo_loss`.
        return_stats: also return :class:`FDPOStats` with per-row ``logits`` z, errors, log-ratios, rewards,
            ``implicit_acc`` (mean of z > 0) and ``extra["kl"]``, the reference point used.
        backend: as in :func:`fused_fdpo_loss`.
    """
    for name in options:
        if name not in KTO_OPTIONS:
            raise TypeError(f"fused_kto_loss got an unexpected option {name!r}; its options are {list(KTO_OPTIONS)}")
    config = config_for(options)
    weights = {"desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    labels = _check_kto(model_pred, target, mask, labels, kl, weights)
    check_inputs(config, model_pred, ref_pred, target, ref_err, mask, None)
    e, e_ref, diff = sample_errors(model_pred, ref_pred, target, ref_err, mask, config, backend)
    kl_point = kto_reference_point(diff, kl, kl_all_reduce)
    losses, logits = kto_head(diff, labels, kl_point, config, (float(desirable_weight), float(undesirable_weight)))
    loss = _reduce(losses, config.reduction)
    if not return_stats:
        return loss
    return loss, kto_stats(logits, e, e_ref, diff, kl_point, config)
