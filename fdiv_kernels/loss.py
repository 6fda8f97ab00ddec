"""The public API: fused_fdpo_loss (functional) and FDPOLoss (module)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from ._validation import REDUCTIONS, validate
from .backends import resolve_backend
from .backends.torch_backend import accumulate_dtype
from .stats import FDPOStats

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """[N, *S] -> contiguous [N, D] (a copy only for non-contiguous input)."""
    return None if x is None else x.reshape(x.shape[0], -1).contiguous()


def fused_fdpo_loss(
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
    backend: str = "auto",
):
    """f-divergence Diffusion-DPO loss, fused: one pass forward, one elementwise pass backward.

    Args:
        model_pred: policy predictions ``[2B, *S]`` (winners then losers; see ``layout``), fp32/fp16/bf16.
        ref_pred: reference-model predictions, same shape and dtype (constant). Or give ``ref_err``.
        target: denoising target ``[2B, *S]``, or ``[B, *S]`` shared by both samples of a pair.
        ref_err: cached per-sample reference errors ``[2B]`` instead of ``ref_pred``.
        beta: Diffusion-DPO beta; ``d = beta/2 * w * (e_ref - e)`` (``beta_convention="half"``, original code and
            diffusers' SDXL script) or ``d = beta * (e_ref - e)`` (``"full"``, diffusers' SD1.5 script).
        divergence: ``reverse_kl`` (Diffusion-DPO), ``forward_kl``, ``js``, ``alpha``, ``hellinger``.
        alpha: the alpha of ``divergence="alpha"``, in (0, 1).
        gamma: outer scale of the logit ``z = gamma * (psi(d_w) - psi(d_l))``.
        label_smoothing: conservative-DPO eps in [0, 0.5).
        pair_weight: per-pair weight ``[B]`` (e.g. timestep weighting), default 1.
        err_reduction: per-sample error as the ``mean`` (default) or ``sum`` over elements.
        mask: per-element weights ``[2B or B, *S]``: errors become masked means (or masked sums).
        layout: ``halves`` (rows ``[w; l]``) or ``interleaved`` (rows ``[w0, l0, w1, l1, ...]``).
        logratio_clip: ``c`` > 0 soft-clamps ``d -> c * tanh(d / c)``.
        reduction: ``mean`` (default), ``sum`` or ``none`` (per-pair ``[B]``).
        implicit_acc_ties: ``half`` (ties count 1/2, diffusers SDXL) or ``strict`` (original code).
        return_stats: also return :class:`FDPOStats`.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.

    Returns:
        The loss (fp32; float64 for float64 inputs), and the statistics if ``return_stats``. Gradients flow into
        ``model_pred`` only.
    """
    p = validate(
        model_pred, ref_pred, target, ref_err=ref_err, beta=beta, divergence=divergence, alpha=alpha,
        gamma=gamma, label_smoothing=label_smoothing, pair_weight=pair_weight, err_reduction=err_reduction,
        mask=mask, layout=layout, beta_convention=beta_convention, logratio_clip=logratio_clip,
        reduction=reduction, implicit_acc_ties=implicit_acc_ties,
    )
    name = resolve_backend(backend, model_pred.device)
    if model_pred.dtype not in _KERNEL_DTYPES and name not in ("cpu", "torch"):
        raise TypeError(
            f"backend={name!r} supports float32, float16 and bfloat16 inputs; got {model_pred.dtype} "
            "(float64 runs on backend='cpu' or 'torch')"
        )
    acc = accumulate_dtype(model_pred.dtype)
    # Compiled graphs call the custom op (traced once); eager calls skip its per-call dispatch cost (ops.py).
    forward = ops.fdpo_forward if torch.compiler.is_compiling() else ops.fdpo_forward_eager
    loss, logits, sample_stats, _ = forward(
        _rows(model_pred),
        _rows(ref_pred),
        _rows(target),
        None if ref_err is None else ref_err.to(acc).contiguous(),
        _rows(mask),
        None if pair_weight is None else pair_weight.to(acc).contiguous(),
        p.beta,
        p.divergence.id,
        p.divergence.alpha,
        p.gamma,
        p.label_smoothing,
        p.err_sum,
        p.logratio_clip or 0.0,
        REDUCTIONS[p.reduction],
        p.interleaved,
        name,
    )
    if not return_stats:
        return loss
    model_err, ref_err_, logratio, reward = sample_stats.unbind(0)
    return loss, FDPOStats.from_tensors(logits, model_err, ref_err_, logratio, reward, p.implicit_acc_ties)


class FDPOLoss(nn.Module):
    """Module form of :func:`fused_fdpo_loss`; the constructor takes its keyword arguments."""

    def __init__(self, **kwargs):
        super().__init__()
        # Validate the configuration now rather than at the first step.
        from .divergences import get_divergence

        get_divergence(kwargs.get("divergence", "reverse_kl"), kwargs.get("alpha", 0.5))
        self.kwargs = kwargs

    def forward(self, model_pred, ref_pred=None, target=None, **overrides):
        return fused_fdpo_loss(model_pred, ref_pred, target, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
