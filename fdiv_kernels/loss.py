"""The public API: fused_fdpo_loss (functional) and FDPOLoss (module)."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import FDPOConfig, check_inputs, config_for, make_config
from .backends import BACKENDS, resolve_backend
from .ops import forward_op
from .stats import FDPOStats

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    loss_type: str = "sigmoid",
    ipo_tau: float | None = None,
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
        err_reduction: per-sample error as the ``mean`` over elements (default; with a mask, the masked mean),
            their ``sum``, or ``mean_all``: the masked sum over all elements divided by their count (trainers that
            average ``err * mask`` over every element, e.g. SimpleTuner's ``norm_type="mean"``).
        mask: per-element weights ``[2B or B, *S]``: errors become masked means (or masked sums).
        layout: ``halves`` (rows ``[w; l]``) or ``interleaved`` (rows ``[w0, l0, w1, l1, ...]``).
        logratio_clip: ``c`` > 0 soft-clamps ``d -> c * tanh(d / c)``.
        reduction: ``mean`` (default), ``sum`` or ``none`` (per-pair ``[B]``).
        implicit_acc_ties: ``half`` (ties count 1/2, diffusers SDXL) or ``strict`` (original code).
        loss_type: the pair loss of the logit z, as diffusers' ``--loss_type``: ``sigmoid`` (default,
            ``-log sigmoid(z)``), ``hinge`` (``relu(1 - z)``) or ``ipo`` (``(z - 1 / (2 ipo_tau))^2``).
        ipo_tau: the regularization of ``loss_type="ipo"``.
        return_stats: also return :class:`FDPOStats`.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.

    Returns:
        The loss (fp32; float64 for float64 inputs), and the statistics if ``return_stats``. Gradients flow into
        ``model_pred`` only.
    """
    # Scalars: validated once per distinct configuration (a cache hit costs a dict lookup).
    config = config_for(
        beta,
        divergence,
        alpha,
        gamma,
        label_smoothing,
        err_reduction,
        layout,
        beta_convention,
        logratio_clip,
        reduction,
        implicit_acc_ties,
        loss_type,
        ipo_tau,
    )
    return _apply(config, backend, return_stats, model_pred, ref_pred, target, ref_err, mask, pair_weight)


def _apply(
    config: FDPOConfig, backend: str, return_stats: bool, model_pred, ref_pred, target, ref_err, mask, pair_weight
):
    """The loss of one call with a validated config: tensor checks, then one op call (statistics included)."""
    check_inputs(config, model_pred, ref_pred, target, ref_err, mask, pair_weight)
    name = resolve_backend(backend, model_pred.device)
    if model_pred.dtype not in _KERNEL_DTYPES and name not in ("cpu", "torch"):
        raise TypeError(
            f"backend={name!r} supports float32, float16 and bfloat16 inputs; got {model_pred.dtype} "
            "(float64 runs on backend='cpu' or 'torch')"
        )
    op = forward_op(name, model_pred.device.type)
    loss, logits, sample_stats, summary, _ = op(
        model_pred, ref_pred, target, ref_err, mask, pair_weight, *config.op_scalars()
    )
    if not return_stats:
        return loss
    return loss, FDPOStats.from_kernel(logits, sample_stats, summary)


class FDPOLoss(nn.Module):
    """Module form of :func:`fused_fdpo_loss`: the configuration is validated once, at construction.

    Takes the scalar keyword arguments of :func:`fused_fdpo_loss` (plus ``return_stats`` and ``backend``); the
    call takes the tensors: ``loss_fn(model_pred, ref_pred, target, ref_err=..., mask=..., pair_weight=...)``.
    """

    def __init__(
        self,
        *,
        beta: float = 5000.0,
        divergence: str = "reverse_kl",
        alpha: float = 0.5,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        err_reduction: str = "mean",
        layout: str = "halves",
        beta_convention: str = "half",
        logratio_clip: float | None = None,
        reduction: str = "mean",
        implicit_acc_ties: str = "half",
        loss_type: str = "sigmoid",
        ipo_tau: float | None = None,
        return_stats: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.config = make_config(
            beta,
            divergence,
            alpha,
            gamma,
            label_smoothing,
            err_reduction,
            layout,
            beta_convention,
            logratio_clip,
            reduction,
            implicit_acc_ties,
            loss_type,
            ipo_tau,
        )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend={backend!r}; expected one of {list(BACKENDS)}")
        self.backend = backend
        self.return_stats = bool(return_stats)
        self._repr = (
            f"divergence={divergence!r}, beta={beta!r}, beta_convention={beta_convention!r}"
            + (f", alpha={alpha!r}" if self.config.divergence.name == "alpha" else "")
            + f", gamma={gamma!r}, backend={backend!r}"
        )

    def forward(self, model_pred, ref_pred=None, target=None, *, ref_err=None, mask=None, pair_weight=None):
        return _apply(
            self.config, self.backend, self.return_stats, model_pred, ref_pred, target, ref_err, mask, pair_weight
        )

    def extra_repr(self) -> str:
        return self._repr
