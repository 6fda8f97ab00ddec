"""The implementations being compared. Each provider builds a ``loss_fn(Inputs) -> scalar loss``.

- ``eager``: the loss as diffusers' ``train_diffusion_dpo_sdxl.py`` writes it (``.float()`` casts, per-sample
  ``mse_loss(...).mean(dims)``, reference branch under ``no_grad``), i.e. what users run today.
- ``compile-diffusers``: ``torch.compile`` of that same function (default mode, ``dynamic=False``): the CPU peer
  of spec §5.
- ``compile-ref``: ``torch.compile`` of ``fdpo_loss_reference`` (default mode, ``dynamic=False``): the GPU peer
  of spec §5.
- ``fdiv-<backend>``: ``fused_fdpo_loss(..., backend=<backend>)`` for cpu (C++), triton, cuda, and torch (the
  eager fallback backend, recorded for completeness).

Every call uses the same loss configuration: reverse KL (Diffusion-DPO), beta 5000, mean reductions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss

from .shapes import Inputs

BETA = 5000.0


def diffusers_style_loss(model_pred, ref_pred, target, ref_err=None, beta: float = BETA):
    """diffusers' SDXL Diffusion-DPO loss, as trainers write it.

    A shared ``[B, ...]`` target is broadcast against the [2, B, ...] view of the predictions instead of being
    materialized with ``repeat`` as the script does: this reads less memory, so it can only flatter the baseline.
    With ``ref_err`` the cached reference errors replace the reference branch.
    """
    rows = model_pred.shape[0]
    if target.shape[0] != rows:
        view = (2, rows // 2, *model_pred.shape[1:])
        pred_f = model_pred.float().view(view)
        target_f = target.float().expand(view)
        dims = list(range(2, pred_f.ndim))
        model_losses = F.mse_loss(pred_f, target_f, reduction="none").mean(dims).flatten()
    else:
        target_f = target.float()
        dims = list(range(1, model_pred.ndim))
        model_losses = F.mse_loss(model_pred.float(), target_f, reduction="none").mean(dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        if ref_err is None:
            if target.shape[0] != rows:
                ref_f = ref_pred.float().view(view)
                ref_losses = F.mse_loss(ref_f, target_f, reduction="none").mean(dims).flatten()
            else:
                ref_losses = F.mse_loss(ref_pred.float(), target_f, reduction="none").mean(dims)
        else:
            ref_losses = ref_err
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean()


def reference_loss(model_pred, ref_pred, target, ref_err=None, beta: float = BETA):
    return fdpo_loss_reference(model_pred, ref_pred, target, ref_err=ref_err, beta=beta)


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "baseline" or "fdiv"
    backend: str | None = None  # fdiv backend name
    compiled: bool = False

    def why_unavailable(self, device: torch.device) -> str | None:
        if self.backend is None:
            return None
        if self.backend == "triton" and device.type == "cpu":
            return "Triton on CPU runs only in the interpreter, which is a correctness tool, not a benchmark provider"
        from fdiv_kernels.backends import _why_unavailable

        try:
            return _why_unavailable(self.backend, device)
        except Exception as err:  # a backend still being written must not stop the run
            return f"availability check failed: {type(err).__name__}: {err}"

    def build(self) -> Callable[[Inputs], torch.Tensor]:
        """A fresh callable. For torch.compile providers a fresh compile: the first call pays the compile."""
        if self.name == "eager":
            return lambda x: diffusers_style_loss(x.model_pred, x.ref_pred, x.target, x.ref_err)
        if self.name == "compile-diffusers":
            fn = torch.compile(diffusers_style_loss, dynamic=False)
            return lambda x: fn(x.model_pred, x.ref_pred, x.target, x.ref_err)
        if self.name == "compile-ref":
            fn = torch.compile(reference_loss, dynamic=False)
            return lambda x: fn(x.model_pred, x.ref_pred, x.target, x.ref_err)
        backend = self.backend
        return lambda x: fused_fdpo_loss(
            x.model_pred, x.ref_pred, x.target, ref_err=x.ref_err, beta=BETA, backend=backend
        )


PROVIDERS = {
    p.name: p
    for p in [
        Provider("eager", "baseline"),
        Provider("compile-diffusers", "baseline", compiled=True),
        Provider("compile-ref", "baseline", compiled=True),
        Provider("fdiv-cpu", "fdiv", "cpu"),
        Provider("fdiv-triton", "fdiv", "triton"),
        Provider("fdiv-cuda", "fdiv", "cuda"),
        Provider("fdiv-torch", "fdiv", "torch"),
    ]
}

# The peers spec §5 (docs/spec.md) names: on CPU torch.compile of the diffusers-style loss, on GPU of the reference.
# Both compile variants are selectable everywhere (--providers); by default each device compiles only its peer,
# since every torch.compile costs seconds per shape and dtype (the GPU run must fit in 4 minutes).
QUICK_EXTRA = {"cpu": ["fdiv-torch"], "cuda": []}
# fdiv-torch (the eager fallback backend) is several times slower than eager and would double the CPU run: it is
# in --quick runs and on request only.
DEFAULT_PROVIDERS = {
    "cpu": ["eager", "compile-diffusers", "fdiv-cpu"],
    "cuda": ["eager", "compile-ref", "fdiv-triton", "fdiv-cuda"],
}
COMPILE_PEER = {"cpu": "compile-diffusers", "cuda": "compile-ref"}
