"""fdiv_kernels: fused f-divergence Diffusion-DPO loss (Sun et al., arXiv 2409.09774) for PyTorch."""

from .divergences import DIVERGENCES, REJECTED_DIVERGENCES, get_divergence
from .gradient_field import gradient_weights
from .integrations import fdpo_loss_from_pairs, trainer_conventions
from .loss import FDPOLoss, fused_fdpo_loss
from .reference import fdpo_loss_reference
from .stats import FDPOStats

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "REJECTED_DIVERGENCES",
    "FDPOLoss",
    "FDPOStats",
    "fdpo_loss_from_pairs",
    "fdpo_loss_reference",
    "fused_fdpo_loss",
    "get_divergence",
    "gradient_weights",
    "trainer_conventions",
]
