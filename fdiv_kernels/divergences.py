"""The f-divergences of f-DPO, once, in PyTorch.

psi(d) = f'(exp(d)) is the implicit reward of a log-ratio d and psi'(d) its slope (spec §2 (docs/spec.md)). Every
function here works elementwise on tensors of any floating dtype, so the reference can run them in float64.
The C++/CUDA twin is ``csrc/fdpo_math.h`` and the Triton twin ``backends/triton_kernels.py``; the tests check
all three against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCES",
    "REJECTED_DIVERGENCES",
    "Divergence",
    "get_divergence",
    "psi",
    "psi_slope",
    "row_errors",
    "psi_diff",
    "clipped_psi_diff",
    "sech2",
    "log_psi_slope",
    "log_sech2",
    "soft_clip",
    "soft_clip_log_slope",
    "scaled_psi_slope",
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
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):  # NumPy's too
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


def _psi_diff_value(div: Divergence, d_w: torch.Tensor, d_l: torch.Tensor) -> torch.Tensor:
    if div.name == "reverse_kl":
        return d_w - d_l
    if div.name == "js":
        return softplus(-d_l) - softplus(-d_w)
    k, s = _exp_family(div)
    a, b = -k * d_w, -k * d_l
    hi = torch.maximum(a, b)
    gap = -(a - b).abs()  # lo - hi <= 0
    half = torch.exp(0.5 * hi)
    magnitude = s * (half * (half * torch.expm1(gap)))  # s * exp(hi) * expm1(lo - hi) <= 0
    value = torch.where(b >= a, -magnitude, magnitude)
    return torch.where(a == b, torch.zeros_like(value), value)  # also for a == b == +-inf: never inf - inf


def _soft_clip_value(d: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = d / clip
    ax = x.abs()
    t = torch.exp(-2.0 * ax)
    clipped = torch.copysign(clip * (-torch.expm1(-2.0 * ax) / (1.0 + t)), x)
    tiny = ax < math.sqrt(torch.finfo(d.dtype).eps / 2)
    return torch.where(tiny, d, clipped), 4.0 * t / ((1.0 + t) * (1.0 + t))


def _mul0_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, but 0 where one factor is 0 and the other +-inf or NaN: the differentiable variant of the kernels'
    mul0 (csrc/fdpo_math.h; backends/torch_backend.py ``_mul0``), for the reference's autograd. Deliberately not the
    same function: mul0 gives 0 wherever a factor is 0, this one the plain product (and its gradient) wherever both
    factors are finite, so that double backward through the reference sees the product's derivatives."""
    bad = ((a == 0) & ~torch.isfinite(b)) | ((b == 0) & ~torch.isfinite(a))
    return torch.where(bad, 0.0, torch.where(bad, 1.0, a) * torch.where(bad, 1.0, b))


def _slope_times(
    g: torch.Tensor, div: Divergence, r: torch.Tensor, clip: float | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """g * |scale| * d psi(soft_clip(r)) / dr (scale omitted: 1), exact also where the slope alone over- or
    underflows but the product does not, and 0 where g = 0 (the kernels' mul0).

    The slope is psi'(c tanh(r/c)) sech^2(r/c) (psi'(r) without a clip), evaluated directly (to the ulp) where
    its logarithm is well inside the dtype's range, else the product is formed as exp(log|g| + log slope).
    Differentiable in g and r (the branch not taken sees harmless arguments, so no inf or NaN reaches its
    gradient): the reference's double backward goes through it.
    """
    info = torch.finfo(r.dtype)
    lo, hi = math.log(info.tiny) + 1, math.log(info.max) - 1

    def fits(log_x):
        return (log_x > lo) & (log_x < hi)

    if clip is None:
        log_b = log_psi_slope(div, r)
        in_range = fits(log_b)
    else:
        log_sech = log_sech2(r / clip)
        log_psi = log_psi_slope(div, soft_clip(r, clip))
        log_b = log_psi + log_sech
        in_range = fits(log_b) & fits(log_sech) & fits(log_psi)  # each factor of the direct product, too
    if scale is not None:
        log_b = log_b + torch.log(scale.abs())
        in_range = in_range & fits(log_b)
    r_safe = torch.where(in_range, r, 0.0)
    direct = psi_slope(div, r_safe) if clip is None else psi_slope(div, soft_clip(r_safe, clip)) * sech2(r_safe / clip)
    if scale is not None:
        direct = direct * scale.abs()
    far = ~in_range & (g != 0) & (log_b != float("-inf"))  # an exactly-0 slope times any g is 0 (mul0)
    g_far = torch.where(far, g, 1.0)
    scaled = torch.sign(g_far) * torch.exp(torch.log(g_far.abs()) + torch.where(far, log_b, 0.0))
    return torch.where(in_range, g * direct, torch.where(far, scaled, 0.0 * g))


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _SoftClip(torch.autograd.Function):
    """c * tanh(d / c) whose backward is sech^2(d / c) itself (autograd of tanh forms 1 - tanh^2, which is 0
    beyond |d / c| ~ 19 in float64); the backward is differentiable again (double backward)."""

    @staticmethod
    def forward(ctx, d, clip):
        ctx.clip = clip
        ctx.save_for_backward(d)
        return _soft_clip_value(d, clip)[0]

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return _mul0_diff(grad, sech2(d / ctx.clip)), None


class _ClippedPsiDiff(torch.autograd.Function):
    """psi(clip(scale * x_w)) - psi(clip(scale * x_l)). Its backward is the upstream gradient times
    +-scale * d psi(clip(r)) / dr evaluated directly (psi' and sech^2, never autograd of the stable forms, which
    cancels), formed by _slope_times: exact also where psi' alone overflows but the product fits, and 0 (mul0)
    where the upstream gradient is 0. Differentiable again (double backward)."""

    @staticmethod
    def forward(ctx, x_w, x_l, scale, div, clip):
        ctx.div, ctx.clip = div, clip
        scale = torch.as_tensor(scale, dtype=x_w.dtype, device=x_w.device)
        ctx.save_for_backward(x_w, x_l, scale)
        r_w, r_l = scale * x_w, scale * x_l
        if clip is not None:
            r_w, r_l = _soft_clip_value(r_w, clip)[0], _soft_clip_value(r_l, clip)[0]
        return _psi_diff_value(div, r_w, r_l)

    @staticmethod
    def backward(ctx, grad):
        x_w, x_l, scale = ctx.saved_tensors
        grad = grad * torch.sign(scale)
        grad_w = _slope_times(grad, ctx.div, scale * x_w, ctx.clip, scale)
        grad_l = -_slope_times(grad, ctx.div, scale * x_l, ctx.clip, scale)
        return grad_w, grad_l, None, None, None


def psi_diff(div: Divergence, d_w: torch.Tensor, d_l: torch.Tensor) -> torch.Tensor:
    """psi(d_w) - psi(d_l), exact near 0 and a correctly signed inf (never inf - inf) at overflow.

    Exponential family: psi_w - psi_l = s * (exp(b) - exp(a)) with a = -k d_w, b = -k d_l, evaluated as
    -+ s * exp(hi) * expm1(lo - hi), with exp(hi) formed as exp(hi/2)^2 so that the product stays finite wherever
    it is representable (exp(hi) alone overflows first when |lo - hi| is tiny). Equal arguments give exactly 0.
    Differentiated (autograd), its gradient is (psi'(d_w), -psi'(d_l)) evaluated directly: exact also where
    autograd of the stable form cancels (expm1's backward at |k (d_w - d_l)| > ~37) or gives inf * 0.
    """
    return clipped_psi_diff(div, d_w, d_l, None)


def clipped_psi_diff(
    div: Divergence, x_w: torch.Tensor, x_l: torch.Tensor, clip: float | None, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """psi(soft_clip(scale * x_w)) - psi(soft_clip(scale * x_l)); under autograd its gradient is
    +-scale * psi'(soft_clip(r)) * sech^2(r / clip) evaluated directly (see _ClippedPsiDiff)."""
    if _wants_grad(x_w, x_l):
        return _ClippedPsiDiff.apply(x_w, x_l, scale, div, clip)
    r_w, r_l = scale * x_w, scale * x_l
    if clip is not None:
        r_w, r_l = _soft_clip_value(r_w, clip)[0], _soft_clip_value(r_l, clip)[0]
    return _psi_diff_value(div, r_w, r_l)


def soft_clip_log_slope(d: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c * tanh(d / c), log sech^2(d / c)), both accurate to a few ulps for every |x| = |d / c|, tiny to huge.

    With t = exp(-2|x|) in (0, 1]: tanh|x| = -expm1(-2|x|) / (1 + t), which does not cancel for small |x| (the
    (1 - t) / (1 + t) form lost everything below c * 6e-8: d = 0 from c ~ 1e9 in fp32), and log sech^2 x =
    log 4 - 2|x| - 2 log1p(t), finite where sech^2 itself underflows (scaled_psi_slope multiplies it with psi' in
    log space). Below |x| = sqrt(eps / 2), tanh x = x to within half an ulp, so d passes unchanged (exact even
    where d / c would be subnormal). The twins: soft_clip in csrc/fdpo_math.h and _soft_clip in
    backends/triton_kernels.py. Forward only.
    """
    return _soft_clip_value(d, clip)[0], log_sech2(d / clip)


def scaled_psi_slope(div: Divergence, d: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """psi'(d) * exp(log_scale): the kernels' slope of the clipped reward (log_scale = log sech^2(d_raw / c), 0
    without a clip). In the exponential family it is one exp(log(s k) - k d + log_scale), finite wherever the
    product is (psi' alone overflows from -k d ~ 88 in fp32, where sech^2 may underflow). Twin of
    scaled_psi_slope in csrc/fdpo_math.h. Forward only."""
    if div.name == "reverse_kl":
        return torch.exp(log_scale)
    if div.name == "js":
        return torch.sigmoid(-d) * torch.exp(log_scale)
    k, s = _exp_family(div)
    return torch.exp(log_scale - k * d + math.log(s * k))


def soft_clip(d: torch.Tensor, clip: float | None) -> torch.Tensor:
    """d -> c * tanh(d / c): bounded log-ratios with a non-zero gradient sech^2(d / c) (spec §2 (docs/spec.md))."""
    if clip is None:
        return d
    if _wants_grad(d):
        return _SoftClip.apply(d, clip)
    return _soft_clip_value(d, clip)[0]


def sech2(x: torch.Tensor) -> torch.Tensor:
    """sech^2(x) = 4t / (1 + t)^2 with t = exp(-2|x|): no 1 - tanh^2 cancellation."""
    t = torch.exp(-2.0 * x.abs())
    return 4.0 * t / ((1.0 + t) * (1.0 + t))


def log_psi_slope(div: Divergence, d: torch.Tensor) -> torch.Tensor:
    """log psi'(d), finite wherever d is (psi' itself over- or underflows beyond |k d| ~ 709 in float64)."""
    if div.name == "reverse_kl":
        return torch.zeros_like(d)
    if div.name == "js":
        return -softplus(d)  # log sigmoid(-d)
    k, s = _exp_family(div)
    return math.log(s * k) - k * d


def log_sech2(x: torch.Tensor) -> torch.Tensor:
    """log sech^2(x) = log 4 - 2|x| - 2 log1p(exp(-2|x|)), finite wherever x is."""
    ax = x.abs()
    return math.log(4.0) - 2.0 * ax - 2.0 * torch.log1p(torch.exp(-2.0 * ax))


def row_errors(pred, ref, target, mask, ref_err, err_reduction: str):
    """Per-sample errors of [rows, D] tensors already in the arithmetic dtype (spec §2): ``(e, e_ref, e_ref - e,
    inv)``, with ``e_ref - e`` accumulated directly as (ref - pred)(ref + pred - 2t), no cancellation, and ``inv``
    the per-row 1/count (0 for an empty mask; a NaN total stays NaN, as in the kernels). ``ref`` or ``ref_err``
    (cached errors) gives the reference. Shared by the reference and the torch backend."""
    if mask is None or err_reduction == "mean_all":  # mean_all: masked sum over all D elements / D
        count = torch.full((pred.shape[0],), pred.shape[1], dtype=pred.dtype, device=pred.device)
    else:
        count = mask.sum(dim=1)
    if err_reduction == "sum":
        inv = torch.ones_like(count)
    else:
        inv = torch.where(count > 0, 1.0 / count.clamp_min(1e-30), torch.zeros_like(count))

    def reduce(x):
        return (x if mask is None else x * mask).sum(dim=1) * inv

    model_err = reduce((pred - target) ** 2)
    if ref is not None:
        return model_err, reduce((ref - target) ** 2), reduce((ref - pred) * (ref + pred - 2 * target)), inv
    return model_err, ref_err, ref_err - model_err, inv
