"""backend="torch": the kernel contract (docs/architecture.md) in eager PyTorch, on any device.

It is the portable fallback one names explicitly, and the readable statement of what the fused kernels compute:
the same per-row sums, the same per-pair head (from ``divergences.py``), the same backward coefficient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..divergences import (
    DIVERGENCES,
    Divergence,
    psi,
    psi_diff,
    row_errors,
    scaled_psi_slope,
    soft_clip_log_slope,
    softplus,
)
from ..options import choices, ids
from ..stats import implicit_wins
from .common import KernelParams, accumulate_dtype, pair_rows, target_rows

_NAMES = {v: k for k, v in DIVERGENCES.items()}
_ERR_REDUCTIONS = choices("err_reduction")  # by id
_MAPO = ids("loss_type")["mapo"]


def pair_head(params: KernelParams, err_gap: torch.Tensor, inv: torch.Tensor, pair_weight: torch.Tensor | None):
    """Per-pair head on fp32 [2B] vectors: returns (loss, logits, logratio, reward, grad_coef)."""
    if params.loss_type == _MAPO:
        return mapo_pair_head(params, err_gap, inv)
    num_pairs = err_gap.shape[0] // 2
    w_rows, l_rows = pair_rows(num_pairs, params.interleaved, err_gap.device)
    div = Divergence(_NAMES[params.divergence], params.divergence, params.alpha)
    # beta/2 * w and the backward's scale in float64 (as csrc/fdpo_math.h): beta/2 * w alone may overflow float32
    # (pair_weight 1e35) where d (policy == reference: 0) and the gradient coefficient do not.
    wide = torch.float64
    weight = 1.0 if pair_weight is None else pair_weight.to(wide)
    half_beta_w = 0.5 * params.beta * weight
    d = torch.empty_like(err_gap)
    d[w_rows] = (half_beta_w * err_gap[w_rows].to(wide)).to(d.dtype)
    d[l_rows] = (half_beta_w * err_gap[l_rows].to(wide)).to(d.dtype)
    log_clip_slope = torch.zeros_like(d)
    if params.logratio_clip > 0:  # c * tanh(d/c) and log sech^2(d/c), both to a few ulps for every |d/c|
        d, log_clip_slope = soft_clip_log_slope(d, params.logratio_clip)
    z = params.gamma * psi_diff(div, d[w_rows], d[l_rows])
    loss, g = link_loss(params, z)
    reduce: dict[int, Callable[[], torch.Tensor]] = {0: lambda: loss, 1: loss.mean, 2: loss.sum}
    reduced = reduce[params.reduction]()
    red = 1.0 / num_pairs if params.reduction == 1 else 1.0
    slope = scaled_psi_slope(div, d, log_clip_slope)
    sign = torch.ones_like(d)
    sign[w_rows] = -1.0
    g_rows = torch.empty_like(d)
    g_rows[w_rows] = g
    g_rows[l_rows] = g
    hbw_rows = torch.empty_like(d, dtype=wide)
    hbw_rows[w_rows] = half_beta_w
    hbw_rows[l_rows] = half_beta_w
    gamma_slope = (sign * params.gamma * slope).to(wide)
    # An infinite g (ipo's 2(z - m) once z overflows) times a slope that underflowed at a finite log-ratio (truly
    # > 0) is infinite, as in the reference; mul0's 0 is for an exactly-0 factor.
    underflowed = (gamma_slope == 0) & d.isfinite() & log_clip_slope.isfinite() & g_rows.isinf()
    gamma_slope = torch.where(underflowed, sign.to(wide), gamma_slope)
    coef = _mul0(_mul0(g_rows.to(wide), gamma_slope), hbw_rows * red * 2 * inv.to(wide)).to(d.dtype)
    return reduced, z, d, psi(div, d), coef


_PHI_SERIES_BELOW = 0.5  # |x| below: Taylor series (x / expm1(x) is 0/0 at 0, its derivative cancels near 0)


def mapo_phi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(x) = x / (e^x - 1) and phi'(x), MaPO's score, as csrc/fdpo_math.h's mapo_phi: accurate to a few ulps
    in float32 and float64 wherever phi is a normal number (tests/test_heads.py checks against mpmath). Below
    |x| = 0.5 the Bernoulli series to x^14 (remainder < 1e-20 relative). Above it, for x > 0, x e^(-x/2) e^(-x/2) /
    (1 - e^-x), which does not overflow where e^x does (x > 88.7 in float32, 709.8 in float64); x / expm1(x) for
    x < 0; phi' = phi (1 - phi - x) / x there, which does not cancel (phi(-x) = phi(x) + x)."""
    small = x.abs() < _PHI_SERIES_BELOW
    xs = torch.where(small, x, torch.zeros_like(x))
    u = xs * xs
    # phi = sum B_n x^n / n!; B_1 = -1/2, then B_2k / (2k)! for k = 1..7
    phi_series = (
        1.0
        - 0.5 * xs
        + u
        * (
            1.0 / 12
            + u
            * (
                -1.0 / 720
                + u
                * (
                    1.0 / 30240
                    + u * (-1.0 / 1209600 + u * (1.0 / 47900160 + u * (-691.0 / 1307674368000 + u / 74724249600)))
                )
            )
        )
    )
    slope_series = -0.5 + xs * (
        1.0 / 6
        + u
        * (
            -1.0 / 180
            + u
            * (1.0 / 5040 + u * (-1.0 / 151200 + u * (1.0 / 4790016 + u * (-691.0 / 108972864000 + u / 5337446400))))
        )
    )
    xl = torch.where(small, torch.ones_like(x), x)
    a = xl.abs()
    h = torch.exp(-0.5 * a)
    phi_pos = (a * h) * h / -torch.expm1(-a)  # x > 0: no overflow; the products stay normal while phi is
    phi_direct = torch.where(xl > 0, phi_pos, xl / torch.expm1(xl))
    slope_direct = phi_direct * ((1.0 - phi_direct - xl) / xl)
    return torch.where(small, phi_series, phi_direct), torch.where(small, slope_series, slope_direct)


def mapo_pair_head(params: KernelParams, err_gap: torch.Tensor, inv: torch.Tensor):
    """MaPO's head (loss_type "mapo", csrc/fdpo_math.h mapo_pair_head): err_gap = e_ref - e = -e (the caller's
    cached reference errors are 0). x = s e, z = T (phi(x_w) - phi(x_l)), loss e_w + beta softplus(-z);
    dL/de_w = 1 - beta sigmoid(-z) T s phi'(x_w), dL/de_l = beta sigmoid(-z) T s phi'(x_l), times red * 2 * inv, in
    the errors' dtype as the kernels (beta and beta T s are validated to float32's range). Returns (loss, logits,
    logratio = x, reward = phi(x), grad_coef)."""
    num_pairs = err_gap.shape[0] // 2
    w_rows, l_rows = pair_rows(num_pairs, params.interleaved, err_gap.device)
    e = -err_gap
    x = params.mapo_snr * e
    phi, slope = mapo_phi(x)
    z = params.mapo_timesteps * (phi[w_rows] - phi[l_rows])
    loss = e[w_rows] + params.beta * softplus(-z)
    reduce: dict[int, Callable[[], torch.Tensor]] = {0: lambda: loss, 1: loss.mean, 2: loss.sum}
    red = 1.0 / num_pairs if params.reduction == 1 else 1.0
    k = torch.sigmoid(-z) * (params.beta * params.mapo_timesteps * params.mapo_snr)
    dloss_de = torch.empty_like(x)
    dloss_de[w_rows] = 1.0 - k * slope[w_rows]
    dloss_de[l_rows] = k * slope[l_rows]
    return reduce[params.reduction](), z, x, phi, dloss_de * (red * 2.0 * inv)


def link_loss(params: KernelParams, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair loss of the logit z for params.loss_type, and its derivative d loss / d z."""
    if params.loss_type == 1:  # hinge; a NaN z gives a NaN loss and slope -1, as relu and its backward do
        above = z >= 1
        return torch.where(above, torch.zeros_like(z), 1 - z), torch.where(above, 0.0, -1.0).to(z.dtype)
    if params.loss_type == 2:  # ipo
        gap = z - params.ipo_margin
        return gap * gap, 2 * gap
    if params.loss_type == 3:  # dmpo: KL(p || q) in z; d/dz = p (1 - p) (z - logit q)
        p, p_loser = torch.sigmoid(z), torch.sigmoid(-z)
        log_q, log_1mq = params.dmpo_log_q, params.dmpo_log_1mq
        loss = _mul0(p, -softplus(-z) - log_q) + _mul0(p_loser, -softplus(z) - log_1mq)
        return loss, _mul0(p * p_loser, z - (log_q - log_1mq))
    eps = params.label_smoothing
    loss = (1 - eps) * softplus(-z)
    g = -(1 - eps) * torch.sigmoid(-z)
    if eps > 0:
        loss = loss + eps * softplus(z)
        g = g + eps * torch.sigmoid(z)
    return loss, g


def _mul0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, but 0 where either is 0 (a saturated sigmoid times an overflowed exp is 0, not NaN): the kernels' mul0
    (csrc/fdpo_math.h, Triton ``_mul0``). The reference uses a differentiable variant, divergences._mul0_diff."""
    return torch.where((a == 0) | (b == 0), torch.zeros_like(a), a * b)


def forward(model_pred, ref_pred, target, ref_err, mask, pair_weight, params: KernelParams):
    rows = model_pred.shape[0]
    acc = accumulate_dtype(model_pred.dtype)
    t_rows = target_rows(rows, target.shape[0], params.interleaved, model_pred.device)
    pred = model_pred.to(acc)
    tgt = target.to(acc)[t_rows]
    m = None if mask is None else mask.to(acc)[target_rows(rows, mask.shape[0], params.interleaved, mask.device)]

    ref = None if ref_pred is None else ref_pred.to(acc)
    model_err, ref_err_, err_gap, inv = row_errors(
        pred, ref, tgt, m, None if ref_err is None else ref_err.to(acc), _ERR_REDUCTIONS[params.err_reduction]
    )
    loss, logits, logratio, reward, coef = pair_head(params, err_gap, inv, pair_weight)
    wins = implicit_wins(logits, bool(params.strict_ties))
    cross = torch.zeros((), dtype=acc, device=model_pred.device)
    if params.cross_term:  # X = sum (pred_w - t_w)(pred_l - t_l), unmasked (a mask is refused)
        if mask is not None:
            raise ValueError("fdiv_kernels (torch): cross_term is defined without a mask; got a mask")
        w_rows, l_rows = pair_rows(rows // 2, params.interleaved, model_pred.device)
        residual = pred - tgt
        cross = (residual[w_rows] * residual[l_rows]).sum()
    summary = torch.stack([wins.mean(), model_err.mean(), ref_err_.mean(), cross])
    return loss, logits, torch.stack([model_err, ref_err_, logratio, reward]), summary, coef


def backward(grad_loss, model_pred, target, mask, grad_coef, interleaved: bool):
    rows = model_pred.shape[0]
    num_pairs = rows // 2
    t_rows = target_rows(rows, target.shape[0], interleaved, model_pred.device)
    pair_of_row = target_rows(rows, num_pairs, interleaved, model_pred.device)
    acc = grad_coef.dtype
    g = grad_loss.to(acc).reshape(-1)
    # mul0 throughout: an overflowed (+-inf) coefficient times a zero G, residual or mask is 0, not NaN.
    scale = _mul0(grad_coef, (g[pair_of_row] if grad_loss.dim() == 1 else g.expand(rows)))
    grad = _mul0(scale[:, None], model_pred.to(acc) - target.to(acc)[t_rows])
    if mask is not None:
        grad = _mul0(grad, mask.to(acc)[target_rows(rows, mask.shape[0], interleaved, mask.device)])
    return grad.to(model_pred.dtype)
