"""The op layer: which op a call runs, and the Python ops for the backends the dispatcher cannot choose.

The fast path is native: ``fdiv_kernels::fdpo_forward`` / ``fdpo_backward`` are defined in C++ (csrc/ops.cpp) with
their autograd and meta kernels, and the dispatcher picks the kernel from the tensors' device: the C++ CPU kernel,
the CUDA C++ kernel, or, in a build without the CUDA kernels, the Triton kernels, registered below as the CUDA
implementation. An eager call is then one dispatcher call forward and one backward, like a native op.

Backends named explicitly that the device's native kernel is not (``backend="torch"`` anywhere, ``"triton"``
where the CUDA C++ kernels are built or on CPU tensors under ``TRITON_INTERPRET=1``) run through
``fdiv_kernels_py::fdpo_forward`` / ``fdpo_backward``: ``torch.library`` custom ops with the same schema plus the
backend's name, the same autograd rules and fake kernels. Both families compile with ``torch.compile(fullgraph=
True)``, pass ``opcheck``, never synchronize with the host, and refuse double backward with a clear error.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .backends import HAS_TRITON, cpp, get_implementation
from .backends.common import KernelParams, accumulate_dtype

_FORWARD_ARGS = 18  # tensors and scalars of fdpo_forward, before the Python ops' backend name

# ---------------------------------------------------------------------------------------------------------------
# Native ops (csrc/ops.cpp), present when the C++ extension loaded.
# ---------------------------------------------------------------------------------------------------------------

NATIVE = cpp.why_unavailable("cpu") is None


def _native_cuda_kernel() -> Optional[str]:
    """The backend behind the native op on CUDA tensors: "cuda", "triton" (registered here) or None."""
    if not NATIVE:
        return None
    if torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels::fdpo_forward", "CUDA"):
        return "cuda"
    if HAS_TRITON and torch.cuda.is_available():
        _register_triton_as_cuda_kernel()
        return "triton"
    return None


def _rows(x: Optional[Tensor]) -> Optional[Tensor]:
    """[N, *S] -> contiguous [N, D] (a copy only for non-contiguous input): the Python backends' contract."""
    return None if x is None else x.reshape(x.shape[0], -1).contiguous()


def _small(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A [2B] / [B] vector (ref_err, pair_weight) in the accumulate dtype of ``like``."""
    return None if x is None else x.to(accumulate_dtype(like.dtype)).contiguous()


def _run_forward(backend: str, model_pred, ref_pred, target, ref_err, mask, pair_weight, *scalars):
    """One backend's forward on the op's arguments (N-D tensors in, the op's five outputs out)."""
    params = KernelParams(*scalars)
    return tuple(
        get_implementation(backend).forward(
            _rows(model_pred),
            _rows(ref_pred),
            _rows(target),
            _small(ref_err, model_pred),
            _rows(mask),
            _small(pair_weight, model_pred),
            params,
        )
    )


def _run_backward(backend: str, grad_loss, model_pred, target, mask, grad_coef, interleaved):
    grad = get_implementation(backend).backward(
        grad_loss.contiguous(), _rows(model_pred), _rows(target), _rows(mask), grad_coef, interleaved
    )
    return grad.view(model_pred.shape)


def _register_triton_as_cuda_kernel() -> None:
    lib = torch.library.Library("fdiv_kernels", "IMPL")
    lib.impl("fdpo_forward", lambda *args: _run_forward("triton", *args), "CUDA")
    lib.impl("fdpo_backward", lambda *args: _run_backward("triton", *args), "CUDA")
    _libraries.append(lib)  # a Library deregisters its kernels when collected


_libraries: list = []
NATIVE_KERNEL = {"cpu": "cpu" if NATIVE else None, "cuda": _native_cuda_kernel()}

# ---------------------------------------------------------------------------------------------------------------
# Python ops for explicitly named backends.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fdiv_kernels_py::fdpo_forward", mutates_args=())
def fdpo_forward_py(
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
    err_reduction: int,
    logratio_clip: float,
    reduction: int,
    loss_type: int,
    ipo_margin: float,
    interleaved: bool,
    strict_ties: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fdiv_kernels::fdpo_forward on the named backend (same outputs)."""
    return _run_forward(
        backend,
        model_pred,
        ref_pred,
        target,
        ref_err,
        mask,
        pair_weight,
        beta,
        divergence,
        alpha,
        gamma,
        label_smoothing,
        err_reduction,
        logratio_clip,
        reduction,
        loss_type,
        ipo_margin,
        interleaved,
        strict_ties,
    )


@fdpo_forward_py.register_fake
def _(
    model_pred,
    ref_pred,
    target,
    ref_err,
    mask,
    pair_weight,
    beta,
    divergence,
    alpha,
    gamma,
    label_smoothing,
    err_reduction,
    logratio_clip,
    reduction,
    loss_type,
    ipo_margin,
    interleaved,
    strict_ties,
    backend,
):
    rows = model_pred.shape[0]
    pairs = rows // 2
    acc = dict(dtype=accumulate_dtype(model_pred.dtype), device=model_pred.device)
    loss = torch.empty((pairs,) if reduction == 0 else (), **acc)
    return loss, torch.empty(pairs, **acc), torch.empty(4, rows, **acc), torch.empty(3, **acc), torch.empty(rows, **acc)


@torch.library.custom_op("fdiv_kernels_py::fdpo_backward", mutates_args=())
def fdpo_backward_py(
    grad_loss: Tensor,
    model_pred: Tensor,
    target: Tensor,
    mask: Optional[Tensor],
    grad_coef: Tensor,
    interleaved: bool,
    backend: str,
) -> Tensor:
    """d loss / d model_pred in model_pred's dtype: grad_coef[i] * grad_loss[pair] * mask * (pred - target)."""
    return _run_backward(backend, grad_loss, model_pred, target, mask, grad_coef, interleaved)


@fdpo_backward_py.register_fake
def _(grad_loss, model_pred, target, mask, grad_coef, interleaved, backend):
    return torch.empty(model_pred.shape, dtype=model_pred.dtype, device=model_pred.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[2], inputs[4], output[4])  # inputs and O(B) coefficients only
    ctx.interleaved, ctx.backend = inputs[16], inputs[18]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_loss, *_stat_grads):
    model_pred, target, mask, grad_coef = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = fdpo_backward_py(grad_loss, model_pred, target, mask, grad_coef, ctx.interleaved, ctx.backend)
    return (grad,) + (None,) * _FORWARD_ARGS


DOUBLE_BACKWARD_ERROR = (
    "fdiv_kernels: double backward through fused_fdpo_loss is not supported (the fused kernels compute first "
    "derivatives only). For a loss on the gradient (create_graph=True), use fdiv_kernels.fdpo_loss_reference, "
    "whose gradient is differentiable."
)


def _no_double_backward(ctx, grad):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


fdpo_forward_py.register_autograd(_backward, setup_context=_setup_context)
fdpo_backward_py.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# ---------------------------------------------------------------------------------------------------------------
# Which op a call runs.
# ---------------------------------------------------------------------------------------------------------------


def _python_op(backend: str) -> Callable:
    def op(*args):
        return fdpo_forward_py(*args, backend)

    return op


# Built once here (not on first use) so that the lookup is a plain dict read under torch.compile.
_OPS: dict[tuple[str, str], Callable] = {
    (backend, device_type): (
        torch.ops.fdiv_kernels.fdpo_forward.default if NATIVE_KERNEL[device_type] == backend else _python_op(backend)
    )
    for backend in ("cpu", "cuda", "triton", "torch")
    for device_type in ("cpu", "cuda")
}


def forward_op(backend: str, device_type: str) -> Callable:
    """The forward op for a concrete backend on a device type: the native op where the dispatcher's kernel for
    that device is that backend, else the Python op bound to the backend's name. Same arguments and outputs."""
    op = _OPS.get((backend, device_type))
    return op if op is not None else _python_op(backend)
