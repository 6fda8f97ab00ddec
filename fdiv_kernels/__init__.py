"""fdiv_kernels: fused f-divergence Diffusion-DPO loss (Sun et al., arXiv 2409.09774) for PyTorch."""

from __future__ import annotations

from .divergences import DIVERGENCES, REJECTED_DIVERGENCES, get_divergence
from .gradient_field import gradient_weights
from .heads import fused_kto_loss
from .integrations import fdpo_loss_from_pairs, trainer_conventions
from .loss import FDPOLoss, fused_fdpo_loss
from .reference import fdpo_loss_reference, kto_loss_reference
from .stats import FDPOStats

__version__ = "0.1.0"


def load() -> dict[str, str | None]:
    """Load the compiled kernels now rather than on the first call that needs them, compiling them into the cache
    if nothing is built for the running torch yet (one to three minutes, once). ``import fdiv_kernels`` never does.

    Returns ``{"cpu": why, "cuda": why}``: None where those kernels can run, else the reason (the one
    ``backend="cpu"``/``"cuda"`` would raise with, and ``backend="auto"`` warns with before using PyTorch).
    """
    from .backends import cpp

    return {kind: cpp.why_unavailable(kind) for kind in ("cpu", "cuda")}  # the first call loads the extension


__all__ = [
    "DIVERGENCES",
    "REJECTED_DIVERGENCES",
    "FDPOLoss",
    "FDPOStats",
    "fdpo_loss_from_pairs",
    "fdpo_loss_reference",
    "fused_fdpo_loss",
    "fused_kto_loss",
    "get_divergence",
    "gradient_weights",
    "kto_loss_reference",
    "load",
    "trainer_conventions",
]
