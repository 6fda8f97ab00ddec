"""backend="cpu" and backend="cuda": the compiled extension ``fdiv_kernels._C`` (csrc/).

``import fdiv_kernels._C`` registers the C++ ops ``fdiv_kernels_C::forward`` / ``fdiv_kernels_C::backward``
(schemas in csrc/ops.cpp) with their CPU implementation (csrc/fdpo_cpu.cpp) and, when built with CUDA, their CUDA
implementation (csrc/fdpo_cuda.cu). This module loads it once and calls the ops with the kernel contract's
arguments (docs/architecture.md); validation, autograd and fake kernels live in ``fdiv_kernels.ops``.
"""

from __future__ import annotations

import torch

from .common import KernelParams

_BUILD_HINT = "run `pip install -e . --no-build-isolation` in the repository root"
_load_error: str | None = None
_loaded = False


def _load() -> str | None:
    """Import fdiv_kernels._C once; None on success, else why it failed."""
    global _loaded, _load_error
    if not _loaded:
        _loaded = True
        try:
            import fdiv_kernels._C  # noqa: F401  (registers the ops)
        except ImportError as err:
            if getattr(err, "name", None) == "fdiv_kernels._C" or "No module named" in str(err):
                _load_error = f"the C++ extension fdiv_kernels._C is not built: {_BUILD_HINT}"
            else:  # built, but against another torch/python (undefined symbol, wrong ABI...)
                _load_error = (
                    f"the C++ extension fdiv_kernels._C failed to load ({err}); it was probably built against "
                    f"another torch than {torch.__version__}: rebuild it ({_BUILD_HINT})"
                )
        except OSError as err:
            _load_error = f"the C++ extension fdiv_kernels._C failed to load ({err}): rebuild it ({_BUILD_HINT})"
    return _load_error


def _probe(kind: str) -> str | None:
    err = _load()
    if err is not None:
        return err
    if kind == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels_C::forward", "CUDA"):
            return (
                "fdiv_kernels._C was built without CUDA kernels (FDIV_KERNELS_BUILD_CUDA=0, or no nvcc / CPU-only "
                "torch at build time): rebuild with `FDIV_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    elif not torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels_C::forward", "CPU"):
        return f"fdiv_kernels._C has no CPU kernel registered (a broken build?): {_BUILD_HINT}"
    return None


# Probed once, when this module is first imported (eagerly, also when the import happens under torch.compile), so
# why_unavailable is a plain dict lookup that Dynamo traces without a graph break.
_STATUS: dict[str, str | None] = {kind: _probe(kind) for kind in ("cpu", "cuda")}


def why_unavailable(kind: str) -> str | None:
    """None if the compiled ``kind`` ("cpu" or "cuda") kernels can run, else the reason."""
    if kind not in _STATUS:
        raise ValueError(f"kind must be 'cpu' or 'cuda'; got {kind!r}")
    return _STATUS[kind]


def forward(model_pred, ref_pred, target, ref_err, mask, pair_weight, params: KernelParams):
    """(loss, logits [B], sample_stats [4, 2B], grad_coef [2B]); see docs/architecture.md."""
    return tuple(
        torch.ops.fdiv_kernels_C.forward(
            model_pred,
            ref_pred,
            target,
            ref_err,
            mask,
            pair_weight,
            float(params.beta),
            int(params.divergence),
            float(params.alpha),
            float(params.gamma),
            float(params.label_smoothing),
            bool(params.err_sum),
            float(params.logratio_clip),
            int(params.reduction),
            bool(params.interleaved),
        )
    )


def backward(grad_loss, model_pred, target, mask, grad_coef, interleaved: bool):
    """grad_coef[row] * grad_loss[pair] * mask * (model_pred - target), in model_pred's dtype."""
    return torch.ops.fdiv_kernels_C.backward(grad_loss, model_pred, target, mask, grad_coef, bool(interleaved))
