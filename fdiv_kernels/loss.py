"""The public API: fused_fdpo_loss (functional) and FDPOLoss (module)."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import FDPOConfig, check_inputs, config_for, make_config
from .backends import BACKENDS
from .backends.common import accumulate_dtype
from .heads import sdpo_loss
from .ops import dispatch
from .options import DEFAULTS, with_options
from .stats import FDPOStats

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@with_options
def fused_fdpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    ref_err: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    **options,
):
    """f-divergence Diffusion-DPO loss, fused: one pass forward, one elementwise pass backward.

    Args:
        model_pred: policy predictions ``[2B, *S]`` (winners then losers; see ``layout``), fp32/fp16/bf16.
        ref_pred: reference-model predictions, same shape and dtype (constant). Or give ``ref_err``.
        target: denoising target ``[2B, *S]``, or ``[B, *S]`` shared by both samples of a pair.
        ref_err: cached per-sample reference errors ``[2B]`` instead of ``ref_pred``.
        mask: per-element weights ``[2B or B, *S]``: errors become masked means (or masked sums).
        pair_weight: per-pair weight ``[B]`` (e.g. timestep weighting), default 1.
        {options}
        return_stats: also return :class:`FDPOStats`.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.

    Returns:
        The loss (fp32; float64 for float64 inputs), and the statistics if ``return_stats``. Gradients flow into
        ``model_pred`` only.
    """
    # Options: validated once per distinct configuration (a cache hit costs a dict lookup).
    config = config_for(options)
    return _apply(config, backend, return_stats, model_pred, ref_pred, target, ref_err, mask, pair_weight)


def _apply(
    config: FDPOConfig, backend: str, return_stats: bool, model_pred, ref_pred, target, ref_err, mask, pair_weight
):
    """The loss of one call with a validated config: tensor checks, then one op call (statistics included)."""
    check_inputs(config, model_pred, ref_pred, target, ref_err, mask, pair_weight)
    name, op = dispatch(backend, model_pred.device)
    if model_pred.dtype not in _KERNEL_DTYPES and name not in ("cpu", "torch"):
        raise TypeError(
            f"backend={name!r} supports float32, float16 and bfloat16 inputs; got {model_pred.dtype} "
            "(float64 runs on backend='cpu' or 'torch')"
        )
    if config.sdpo_mu is not None:  # the SDPO safeguard scales the same fused passes' coefficients (heads.py)
        return sdpo_loss(model_pred, ref_pred, target, ref_err, pair_weight, config, backend, return_stats)
    if config.loss_type == "mapo":  # reference-free: the kernels read cached reference errors of 0, so e_ref - e = -e
        ref_err = torch.zeros(model_pred.shape[0], dtype=accumulate_dtype(model_pred.dtype), device=model_pred.device)
    loss, logits, sample_stats, summary, _ = op(
        model_pred, ref_pred, target, ref_err, mask, pair_weight, *config.op_scalars()
    )
    if not return_stats:
        return loss
    return loss, FDPOStats.from_kernel(logits, sample_stats, summary)


@with_options
class FDPOLoss(nn.Module):
    """Module form of :func:`fused_fdpo_loss`: the configuration is validated once, at construction.

    The call takes the tensors: ``loss_fn(model_pred, ref_pred, target, ref_err=..., mask=..., pair_weight=...)``.

    Args:
        {options}
        return_stats: also return :class:`FDPOStats`.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.
    """

    def __init__(self, *, return_stats: bool = False, backend: str = "auto", **options):
        super().__init__()
        self.config = make_config(**options)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend={backend!r}; expected one of {list(BACKENDS)}")
        self.backend = backend
        self.return_stats = bool(return_stats)
        shown = {**DEFAULTS, **options}
        self._repr = (
            f"divergence={shown['divergence']!r}, beta={shown['beta']!r}, "
            f"beta_convention={shown['beta_convention']!r}"
            + (f", alpha={shown['alpha']!r}" if self.config.divergence.name == "alpha" else "")
            + f", gamma={shown['gamma']!r}, backend={backend!r}"
        )

    def forward(self, model_pred, ref_pred=None, target=None, *, ref_err=None, mask=None, pair_weight=None):
        return _apply(
            self.config, self.backend, self.return_stats, model_pred, ref_pred, target, ref_err, mask, pair_weight
        )

    def extra_repr(self) -> str:
        return self._repr
