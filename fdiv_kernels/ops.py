"""The op layer: the one table that decides what a call runs, and the Python ops for the backends the dispatcher
cannot choose.

The dispatch table (docs/architecture.md draws it), requested backend x device type -> concrete backend -> op:

    requested   CPU tensors                          CUDA tensors
    auto        cpu    -> native op (C++ kernel)     cuda   -> native op (CUDA C++ kernel), or
                                                     triton -> native op (Triton registered as its CUDA kernel), or
                                                     triton -> Python op (no C++ extension)
                falling back to torch (Python op) with a warning where none of those can run
    cpu         cpu    -> native op                  error
    cuda        error                                cuda   -> native op
    triton      triton -> Python op (TRITON_INTERPRET=1)   triton -> native op where Triton is its CUDA kernel,
                                                     else Python op
    torch       torch  -> Python op                  torch  -> Python op

``dispatch`` fills it on first use per (requested, device type): that loads the C++ extension (backends/cpp.py)
and, in a build without the CUDA kernels, registers the Triton kernels as the native op's CUDA kernel. Nothing
loads or registers at import.

Two op families, because one cannot serve every backend: the native ``fdiv_kernels::fdpo_forward`` /
``fdpo_backward`` (csrc/ops.cpp: schema, C++ autograd and meta kernels; the dispatcher picks the kernel from the
device, so an eager call has no Python below this module), and the Python ``fdiv_kernels_py::`` custom ops with the
same schema plus the backend's name, for explicitly named backends that are not the device's native kernel and for
machines without the C++ extension. The Python family's output shapes come from ``backends.common.
empty_forward_outputs`` (twin of fdpo_op.h's), its double-backward message is ``DOUBLE_BACKWARD_ERROR``
(tests/test_ops.py checks that the C++ one says the same), and the op's configuration is the packed ``(fparams,
iparams)`` pair of options.OP_FLOATS / OP_INTS. Both families compile with ``torch.compile(fullgraph=True)``, pass
``opcheck``, never synchronize with the host, and refuse double backward with a clear error.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import backends
from .backends import AUTO_CUDA_ORDER, BACKENDS, HAS_TRITON, cpp, get_implementation
from .backends.common import KernelParams, accumulate_dtype, empty_forward_outputs

# ---------------------------------------------------------------------------------------------------------------
# The dispatch table.
# ---------------------------------------------------------------------------------------------------------------

_TABLE: dict[tuple[str, str], tuple[str, Callable]] = {}  # (requested, device type) -> (concrete backend, op)
_NATIVE_KERNEL: dict[str, Optional[str]] = {}  # device type -> the backend behind the native op there, or None


def dispatch(requested: str, device: torch.device) -> tuple[str, Callable]:
    """The concrete backend and the forward op of a call on ``device`` (raises with the reason if ``requested``
    cannot run there). A dict read once filled; filled on first use, eagerly also under torch.compile."""
    if torch.compiler.is_compiling():
        # _fill runs eagerly (a constant to Dynamo; no guard on the table, which it may change), then _op_for reads
        # what it filled.
        concrete = _fill(requested, device.type)
        return concrete, _op_for(concrete, device.type)
    key = (requested, device.type)
    entry = _TABLE.get(key)
    if entry is None:
        _fill(*key)
        entry = _TABLE[key]
    return entry


@cpp.eager_under_compile  # not torch._dynamo.assume_constant_result: that import costs ~1.2 s at import
def _fill(requested: str, device_type: str) -> str:
    """Fill the table's entry (loading the extension, registering Triton where needed); the concrete backend."""
    concrete = _resolve(requested, torch.device(device_type))
    _TABLE[(requested, device_type)] = (concrete, _op_for(concrete, device_type))
    return concrete


def _resolve(requested: str, device: torch.device) -> str:
    """The user's backend choice (or "auto") on ``device`` -> a concrete backend that can run there."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend={requested!r}; expected one of {list(BACKENDS)}")
    if requested != "auto":
        why = backends._why_unavailable(requested, device)
        if why is not None:
            raise RuntimeError(f"backend={requested!r} is unavailable: {why}")
        return requested
    candidates = AUTO_CUDA_ORDER if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
    reasons = []
    for candidate in candidates:
        why = backends._why_unavailable(candidate, device)
        if why is None:
            return candidate
        reasons.append(why)
    _warn_fallback(device, reasons)
    return "torch"


_warned: set[str] = set()


def _warn_fallback(device: torch.device, reasons: list[str]) -> None:
    if device.type not in _warned:
        _warned.add(device.type)
        import warnings

        warnings.warn(
            f"fdiv_kernels: no fused kernel for {device.type} tensors ({'; '.join(reasons) or 'unsupported device'}); "
            "backend='auto' uses the eager PyTorch backend",
            RuntimeWarning,
            stacklevel=5,
        )


def _op_for(concrete: str, device_type: str) -> Callable:
    """The native op where the dispatcher's kernel for ``device_type`` is ``concrete``, else the Python op."""
    if concrete != "torch" and native_kernel(device_type) == concrete:  # torch never needs the extension loaded
        return torch.ops.fdiv_kernels.fdpo_forward.default
    return _python_op(concrete)


def backward_op_for(concrete: str, device_type: str) -> Callable:
    """The backward op paired with ``_op_for(concrete, device_type)`` (for heads.py, whose autograd calls the fused
    backward pass with coefficients of its own): ``op(grad_loss, model_pred, target, mask, grad_coef, interleaved)``."""
    if concrete != "torch" and native_kernel(device_type) == concrete:
        return torch.ops.fdiv_kernels.fdpo_backward.default
    return lambda *args: fdpo_backward_py(*args, concrete)


def native_kernel(device_type: str) -> Optional[str]:
    """The backend behind the native op on ``device_type`` tensors ("cpu", "cuda", "triton") or None (no C++
    extension, or no kernel for that device); the first ask on CUDA registers Triton where it is the answer."""
    if device_type not in _NATIVE_KERNEL:
        _NATIVE_KERNEL[device_type] = _find_native_kernel(device_type)
    return _NATIVE_KERNEL[device_type]


def _find_native_kernel(device_type: str) -> Optional[str]:
    if cpp.why_unavailable("cpu") is not None:  # no extension: no native op
        return None
    if device_type == "cpu":
        return "cpu"
    if device_type != "cuda":
        return None
    if cpp.why_unavailable("cuda") is None:
        return "cuda"
    if HAS_TRITON and torch.cuda.is_available():
        _register_triton_as_cuda_kernel()
        return "triton"
    return None


def _register_triton_as_cuda_kernel() -> None:
    lib = torch.library.Library("fdiv_kernels", "IMPL")
    lib.impl("fdpo_forward", lambda *args: _run_forward("triton", *args), "CUDA")
    lib.impl("fdpo_backward", lambda *args: _run_backward("triton", *args), "CUDA")
    _libraries.append(lib)  # a Library deregisters its kernels when collected


_libraries: list = []


# ---------------------------------------------------------------------------------------------------------------
# The Python backends behind both op families.
# ---------------------------------------------------------------------------------------------------------------


def _rows(x: Optional[Tensor]) -> Optional[Tensor]:
    """[N, *S] -> contiguous [N, D] (a copy only for non-contiguous input): the Python backends' contract."""
    return None if x is None else x.reshape(x.shape[0], -1).contiguous()


def _small(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A [2B] / [B] vector (ref_err, pair_weight) in the accumulate dtype of ``like``."""
    return None if x is None else x.to(accumulate_dtype(like.dtype)).contiguous()


def _run_forward(backend: str, model_pred, ref_pred, target, ref_err, mask, pair_weight, fparams, iparams):
    """One backend's forward on the op's arguments (N-D tensors in, the op's five outputs out)."""
    return tuple(
        get_implementation(backend).forward(
            _rows(model_pred),
            _rows(ref_pred),
            _rows(target),
            _small(ref_err, model_pred),
            _rows(mask),
            _small(pair_weight, model_pred),
            KernelParams.unpack(fparams, iparams),
        )
    )


def _run_backward(backend: str, grad_loss, model_pred, target, mask, grad_coef, interleaved):
    grad = get_implementation(backend).backward(
        grad_loss.contiguous(), _rows(model_pred), _rows(target), _rows(mask), grad_coef, interleaved
    )
    return grad.view(model_pred.shape)


# ---------------------------------------------------------------------------------------------------------------
# Python ops for explicitly named backends (and machines without the C++ extension).
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fdiv_kernels_py::fdpo_forward", mutates_args=())
def fdpo_forward_py(
    model_pred: Tensor,
    ref_pred: Optional[Tensor],
    target: Tensor,
    ref_err: Optional[Tensor],
    mask: Optional[Tensor],
    pair_weight: Optional[Tensor],
    fparams: list[float],
    iparams: list[int],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fdiv_kernels::fdpo_forward on the named backend (same outputs)."""
    return _run_forward(backend, model_pred, ref_pred, target, ref_err, mask, pair_weight, fparams, iparams)


@fdpo_forward_py.register_fake
def _(model_pred, ref_pred, target, ref_err, mask, pair_weight, fparams, iparams, backend):
    return empty_forward_outputs(model_pred, KernelParams.unpack(fparams, iparams).reduction)


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
    model_pred, _, target, _, mask, _, fparams, iparams, backend = inputs
    ctx.save_for_backward(model_pred, target, mask, output[4])  # inputs and O(B) coefficients only
    ctx.interleaved, ctx.backend = bool(KernelParams.unpack(fparams, iparams).interleaved), backend
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_loss, *_stat_grads):
    model_pred, target, mask, grad_coef = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = fdpo_backward_py(grad_loss, model_pred, target, mask, grad_coef, ctx.interleaved, ctx.backend)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


# The C++ twin is in csrc/ops.cpp (FdpoBackward::backward); tests/test_ops.py checks both raise this text.
DOUBLE_BACKWARD_ERROR = (
    "fdiv_kernels: double backward through fused_fdpo_loss is not supported (the fused kernels compute first "
    "derivatives only). For a loss on the gradient (create_graph=True), use fdiv_kernels.fdpo_loss_reference, "
    "whose gradient is differentiable."
)


def _no_double_backward(ctx, grad):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


fdpo_forward_py.register_autograd(_backward, setup_context=_setup_context)
fdpo_backward_py.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

_python_ops: dict[str, Callable] = {}


def _python_op(backend: str) -> Callable:
    op = _python_ops.get(backend)
    if op is None:

        def op(*args):
            return fdpo_forward_py(*args, backend)

        if not torch.compiler.is_compiling():
            _python_ops[backend] = op
    return op
