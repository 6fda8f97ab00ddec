"""The torch.library custom ops: one forward op, one backward op, one set of autograd rules for every backend.

``fdiv_kernels::fdpo_forward`` and ``fdiv_kernels::fdpo_backward`` take the 2-D contiguous views of the
kernel contract (docs/architecture.md) and a concrete backend name, and dispatch to that backend's
``forward``/``backward``. Fake kernels give torch.compile the output shapes, so a compiled graph calls the ops
without a graph break; nothing here syncs with the host, so CUDA graphs can capture them.

Eager calls take ``fdpo_forward_eager``: a plain ``autograd.Function`` with the same autograd rules
(``_setup_context`` / ``_backward_rule``) that calls the backend directly. torch.library's Python dispatch of a
custom op (argument normalization, redispatch, the autograd wrapper) costs ~0.1-0.4 ms of host time per
forward+backward, which at diffusion-sized inputs is longer than the kernels themselves; under torch.compile
the ops are traced once, so the compiled path keeps them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import get_implementation
from .backends.common import KernelParams


def _params(beta, divergence, alpha, gamma, label_smoothing, err_sum, logratio_clip, reduction, interleaved):
    return KernelParams(beta, divergence, alpha, gamma, label_smoothing, err_sum, logratio_clip, reduction, interleaved)


def _forward(
    model_pred: Tensor,
    ref_pred: Optional[Tensor],
    target: Tensor,
    ref_err: Optional[Tensor],
    mask: Optional[Tensor],
    pair_weight: Optional[Tensor],
    beta: float,
    divergence: int,
    alpha: float,
    gamma: float,
    label_smoothing: float,
    err_sum: bool,
    logratio_clip: float,
    reduction: int,
    interleaved: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, logits [B], sample_stats [4, 2B], grad_coef [2B]) in float32 (float64 for float64 inputs)."""
    params = _params(beta, divergence, alpha, gamma, label_smoothing, err_sum, logratio_clip, reduction, interleaved)
    return tuple(get_implementation(backend).forward(model_pred, ref_pred, target, ref_err, mask, pair_weight, params))


fdpo_forward = torch.library.custom_op("fdiv_kernels::fdpo_forward", _forward, mutates_args=())


@fdpo_forward.register_fake
def _(model_pred, ref_pred, target, ref_err, mask, pair_weight, beta, divergence, alpha, gamma, label_smoothing,
      err_sum, logratio_clip, reduction, interleaved, backend):
    rows = model_pred.shape[0]
    pairs = rows // 2
    acc = dict(dtype=torch.float64 if model_pred.dtype == torch.float64 else torch.float32, device=model_pred.device)
    loss = torch.empty((pairs,) if reduction == 0 else (), **acc)
    return loss, torch.empty(pairs, **acc), torch.empty(4, rows, **acc), torch.empty(rows, **acc)


@torch.library.custom_op("fdiv_kernels::fdpo_backward", mutates_args=())
def fdpo_backward(
    grad_loss: Tensor,
    model_pred: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    grad_coef: Tensor,
    interleaved: bool,
    backend: str,
) -> Tensor:
    """d loss / d model_pred, in model_pred's dtype: grad_coef[i] * grad_loss[pair] * mask * (pred - target)."""
    return get_implementation(backend).backward(grad_loss, model_pred, target, mask, grad_coef, interleaved)


@fdpo_backward.register_fake
def _(grad_loss, model_pred, target, mask, grad_coef, interleaved, backend):
    return torch.empty_like(model_pred)


def _setup_context(ctx, inputs, output):
    model_pred, _, target, _, mask, *_ = inputs
    interleaved, backend = inputs[14], inputs[15]
    ctx.save_for_backward(model_pred, target, mask, output[3])  # inputs and O(B) scalars only
    ctx.interleaved, ctx.backend = interleaved, backend
    ctx.mark_non_differentiable(*output[1:])
    # The statistics are not differentiable: no zero-filled gradients for them (3 kernel launches on CUDA).
    ctx.set_materialize_grads(False)


def _backward_rule(backward_call):
    """The backward of fdpo_forward, computing d loss / d model_pred with ``backward_call`` (op or backend)."""

    def backward(ctx, grad_loss, *_unused_stat_grads):
        model_pred, target, mask, grad_coef = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = backward_call(grad_loss.contiguous(), model_pred, target, mask, grad_coef, ctx.interleaved,
                                 ctx.backend)
        return (grad,) + (None,) * 15

    return backward


torch.library.register_autograd("fdiv_kernels::fdpo_forward", _backward_rule(fdpo_backward),
                                setup_context=_setup_context)


def _backend_backward(grad_loss, model_pred, target, mask, grad_coef, interleaved, backend):
    return get_implementation(backend).backward(grad_loss, model_pred, target, mask, grad_coef, interleaved)


class _FDPOEager(torch.autograd.Function):
    """fdpo_forward for eager mode: the op's implementation and autograd rules, without custom-op dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _forward(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs

    backward = staticmethod(_backward_rule(_backend_backward))


def fdpo_forward_eager(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same arguments, results and gradients as ``fdpo_forward``; for eager calls (see the module docstring)."""
    return _FDPOEager.apply(*inputs)
