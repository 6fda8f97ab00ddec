"""The f-divergences of f-DPO, once, in PyTorch.

psi(d) = f'(exp(d)) is the implicit reward of a log-ratio d and psi'(d) its slope (SPEC section 2). Every
function here works elementwise on tensors of any floating dtype, so the reference can run them in float64.
The C++/CUDA twin is ``csrc/fdpo_math.h`` and the Triton twin ``backends/triton_kernels.py``; the tests check
all three against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCES",
    "REJECTED_DIVERGENCES",
    "Divergence",
    "get_divergence",
    "psi",
    "psi_slope",
    "psi_diff",
    "soft_clip",
    "softplus",
]

# Ids shared with the kernels (csrc/fdpo_math.h enum Divergence).
DIVERGENCES: dict[str, int] = {"reverse_kl": 0, "forward_kl": 1, "js": 2, "alpha": 3, "hellinger": 4}

REJECTED_DIVERGENCES: dict[str, str] = {
    "chi2": (
        "Pearson chi-squared has f'(u) = 2(u - 1), whose domain contains 0, so the partition function does "
        "not cancel from the f-DPO objective (Wang et al., ICLR 2024, Theorem 1)"
    ),
    "tv": (
        "total variation has f'(u) = sign(u - 1)/2, which is not invertible, so the implicit reward does "
        "not determine the policy (Wang et al., ICLR 2024)"
    ),
}
_ALIASES = {
    "kl": "reverse_kl",
    "reverse-kl": "reverse_kl",
    "forward-kl": "forward_kl",
    "jensen_shannon": "js",
    "jensen-shannon": "js",
    "pearson": "chi2",
    "chi_squared": "chi2",
    "total_variation": "tv",
}


@dataclass(frozen=True)
class Divergence:
    """A validated divergence choice: its name, kernel id and alpha (used by ``alpha`` only)."""

    name: str
    id: int
    alpha: float = 0.5


def get_divergence(divergence: str, alpha: float = 0.5) -> Divergence:
    """Validate a divergence name (and alpha) and return its kernel descriptor."""
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a str, one of {sorted(DIVERGENCES)}; got {type(divergence).__name__}")
    name = _ALIASES.get(divergence.lower(), divergence.lower())
    if name in REJECTED_DIVERGENCES:
        raise ValueError(
            f"divergence={divergence!r} violates the f-DPO condition: {REJECTED_DIVERGENCES[name]}. "
            f"Use one of {sorted(DIVERGENCES)}."
        )
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence={divergence!r}; expected one of {sorted(DIVERGENCES)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (0, 1); got {type(alpha).__name__}")
    alpha = float(alpha)
    if name == "alpha" and not (0.0 < alpha < 1.0):
        raise ValueError(
            f"alpha={alpha} is outside (0, 1): the alpha-divergence of f-DPO needs 0 < alpha < 1 "
            "(alpha -> 0 is reverse KL, alpha -> 1 forward KL; pass divergence='reverse_kl' or 'forward_kl')"
        )
    return Divergence(name, DIVERGENCES[name], alpha)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), exact everywhere (F.softplus returns x itself above its threshold of 20)."""
    return -F.logsigmoid(-x)


def _exp_family(div: Divergence) -> tuple[float, float]:
    """psi(d) = s * (1 - exp(-k d)) (+ a constant for forward KL): returns (k, s)."""
    if div.name == "alpha":
        return div.alpha, 1.0 / div.alpha
    if div.name == "hellinger":
        return 0.5, 1.0
    return 1.0, 1.0  # forward_kl


def psi(div: Divergence, d: torch.Tensor) -> torch.Tensor:
    """Implicit reward psi(d) = f'(exp(d)) in a stable form (never log(2u/(1+u)) with u = exp(d))."""
    if div.name == "reverse_kl":
        return d
    if div.name == "forward_kl":
        return -torch.exp(-d)
    if div.name == "js":
        return math.log(2.0) - softplus(-d)
    k, s = _exp_family(div)
    return -s * torch.expm1(-k * d)


def psi_slope(div: Divergence, d: torch.Tensor) -> torch.Tensor:
    """psi'(d)."""
    if div.name == "reverse_kl":
        return torch.ones_like(d)
    if div.name == "js":
        return torch.sigmoid(-d)
    k, s = _exp_family(div)
    return (s * k) * torch.exp(-k * d)


def psi_diff(div: Divergence, d_w: torch.Tensor, d_l: torch.Tensor) -> torch.Tensor:
    """psi(d_w) - psi(d_l), exact near 0 and a correctly signed inf (never inf - inf) at overflow."""
    if div.name == "reverse_kl":
        return d_w - d_l
    if div.name == "js":
        return softplus(-d_l) - softplus(-d_w)
    k, s = _exp_family(div)
    a, b = -k * d_w, -k * d_l  # psi_w - psi_l = s * (exp(b) - exp(a))
    # Factor out the larger exponent: s * exp(hi) * expm1(gap), gap <= 0. Branch by where() on the inputs (not
    # max/min, which split the gradient at ties) so autograd is right at d_w == d_l, the first fine-tuning step.
    b_ge = b >= a
    hi = torch.where(b_ge, b, a)
    gap = torch.where(b_ge, a - b, b - a)
    value = (s * torch.where(b_ge, -1.0, 1.0).to(hi.dtype)) * torch.exp(hi) * torch.expm1(gap)
    return torch.where((gap == 0) & torch.isinf(hi.exp()), torch.zeros_like(value), value)  # never inf * 0


def soft_clip(d: torch.Tensor, clip: float | None) -> torch.Tensor:
    """d -> c * tanh(d / c): bounded log-ratios with a non-zero gradient (SPEC section 2)."""
    if clip is None:
        return d
    return clip * torch.tanh(d / clip)
