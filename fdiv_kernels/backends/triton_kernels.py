"""backend="triton": the kernel contract (docs/architecture.md) as three Triton kernels.

Forward = 2 launches:
  1. ``_partials_kernel``, grid (pairs, chunks): one pass over model_pred, ref_pred and target (a shared
     target row is read once for both samples of its pair), writing per-row partial sums of one chunk of D
     into a small fp32 workspace (with cross_term, CROSS: also the pair's cross sum of the two rows' residuals).
     No atomics, so the result has the same bits every run.
  2. ``_head_kernel``, one program: reduces the partials over chunks in a fixed order and evaluates the
     per-pair head (the twin of ``fdpo_pair_head`` in csrc/fdpo_math.h), the stats and the reduced loss.
Backward = 1 launch: ``_backward_kernel``, grid (rows, chunks), grad = coef * G * m * (pred - target).

The math helpers below mirror csrc/fdpo_math.h. They avoid libdevice (its module path differs between
Triton versions and the interpreter lacks it), so expm1/log1p use Kahan's tricks on plain exp/log (on
NVIDIA GPUs tl.log compiles to an accurate logf, which the trick needs; tl.exp to ex2.approx). Every
``tl.where`` evaluates both sides: where the side not taken could turn into NaN, it gets a harmless argument.
On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1); grids are kept tiny there.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .common import KernelParams, empty_forward_outputs

_FP32_MAX = tl.constexpr(3.4028234663852886e38)

# Ids of csrc/fdpo_math.h (enum Divergence, enum Reduction).
_REVERSE_KL = tl.constexpr(0)
_FORWARD_KL = tl.constexpr(1)
_JS = tl.constexpr(2)
_ALPHA = tl.constexpr(3)
_HELLINGER = tl.constexpr(4)
_NONE = tl.constexpr(0)
_MEAN = tl.constexpr(1)
_ERR_MEAN = tl.constexpr(0)  # ErrReduction ids (csrc/fdpo_math.h)
_ERR_SUM = tl.constexpr(1)
_HINGE = tl.constexpr(1)  # LossType ids (csrc/fdpo_math.h); sigmoid is 0
_IPO = tl.constexpr(2)
_DMPO = tl.constexpr(3)
_MAPO = tl.constexpr(4)

# Launch shapes. GPU: 8 contiguous elements per thread (16-byte accesses for fp16/bf16), grids of _WAVES waves of
# the kernel's resident programs (_resident_programs) so that few long rows still fill the machine. Interpreter:
# every program instance costs ~1 ms of Python, so at most 2 chunks per row (still exercising the chunked path and
# the tail masks).
_FWD_BLOCK, _FWD_WARPS = 1024, 4
_BWD_BLOCK, _BWD_WARPS = 2048, 8
_WAVES = 4  # waves of resident programs a grid is cut into (several short ones, not one long one)
_FOLD = tl.constexpr(8)  # forward: elements a thread sums before they meet the accumulators (_FWD_BLOCK / 32 / warps)
_CPU_BLOCK, _CPU_MAX_CHUNKS = 256, 2
_HEAD_MAX_BLOCK, _HEAD_TILE = 256, 2048  # head: pairs per step, and pairs * chunks per partials tile
_MAX_ROW_LEN = 2**31 - 1 - max(_FWD_BLOCK, _BWD_BLOCK)


# ----------------------------------------------------------------------------------------------------------
# Math helpers (twins of csrc/fdpo_math.h)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """exp(x) - 1 accurate near 0 (Kahan): the rounding error of u = exp(x) cancels in (u - 1) / log(u)."""
    u = tl.exp(x)
    um1 = u - 1.0
    exact = (u == 1.0) | (um1 == -1.0) | (u > _FP32_MAX)  # x tiny, exp underflowed, exp overflowed
    safe_u = tl.where(exact, 2.0, u)
    kahan = (safe_u - 1.0) * (x / tl.log(safe_u))  # x / log(u) ~ 1: no overflow for u near FP32_MAX
    return tl.where(u == 1.0, x, tl.where(exact, um1, kahan))


@triton.jit
def _log1p(x):
    """log(1 + x) accurate near 0 (Kahan): log(u) * x / (u - 1) with u = 1 + x rounded."""
    u = 1.0 + x
    tiny = u == 1.0
    safe_u = tl.where(tiny, 2.0, u)
    return tl.where(tiny, x, tl.log(safe_u) * x / (safe_u - 1.0))


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _mul0(a, b):
    """a * b, but 0 whenever either factor is 0: a saturated sigmoid times an overflowed exp is 0, not NaN."""
    a_zero = a == 0.0
    b_zero = b == 0.0  # no `|` of the two: the interpreter cannot or a scalar with a block
    product = tl.where(b_zero, 1.0, a) * tl.where(a_zero, 1.0, b)  # never computes 0 * inf
    return tl.where(a_zero, 0.0, tl.where(b_zero, 0.0, product))


@triton.jit
def _exp_family(alpha, DIVERGENCE: tl.constexpr):
    """Rate k and scale s of the exponential family psi(d) = s * (1 - exp(-k d)) (+ a constant)."""
    if DIVERGENCE == _ALPHA:
        return alpha, 1.0 / alpha
    elif DIVERGENCE == _HELLINGER:
        return 0.5, 1.0
    else:  # forward KL
        return 1.0, 1.0


@triton.jit
def _psi(d, alpha, DIVERGENCE: tl.constexpr):
    """The implicit reward psi(d) = f'(exp(d)) in the stable forms of spec §2 (docs/spec.md)."""
    if DIVERGENCE == _REVERSE_KL:
        return d
    elif DIVERGENCE == _FORWARD_KL:
        return -tl.exp(-d)
    elif DIVERGENCE == _JS:
        return 0.6931471805599453 - _softplus(-d)  # log 2 - softplus(-d)
    elif DIVERGENCE == _ALPHA:
        return -_expm1(-alpha * d) / alpha
    else:  # hellinger
        return -_expm1(-0.5 * d)


@triton.jit
def _scaled_psi_slope(d, log_scale, alpha, DIVERGENCE: tl.constexpr):
    """psi'(d) * exp(log_scale) (log_scale: log sech^2 of the clip); in the exponential family as one
    exp(log(s k) - k d + log_scale), finite wherever the product is (exp(-k d) alone overflows from ~88)."""
    if DIVERGENCE == _REVERSE_KL:
        return tl.exp(log_scale)
    elif DIVERGENCE == _JS:
        return _sigmoid(-d) * tl.exp(log_scale)
    else:
        k, s = _exp_family(alpha, DIVERGENCE)
        if DIVERGENCE == _HELLINGER:  # log(s k): s k = 1/2 for hellinger, 1 for forward KL and alpha
            return tl.exp(log_scale - k * d - 0.6931471805599453)
        else:
            return tl.exp(log_scale - k * d)


@triton.jit
def _psi_diff(d_w, d_l, alpha, DIVERGENCE: tl.constexpr):
    """psi(d_w) - psi(d_l) without cancellation near 0 and without inf - inf at overflow."""
    if DIVERGENCE == _REVERSE_KL:
        return d_w - d_l
    elif DIVERGENCE == _JS:
        return _softplus(-d_l) - _softplus(-d_w)
    else:
        k, s = _exp_family(alpha, DIVERGENCE)
        a = -k * d_w
        b = -k * d_l  # psi_w - psi_l = s * (exp(b) - exp(a)) = sign * s * exp(hi) * (1 - exp(lo - hi))
        hi = tl.where(b > a, b, a)  # not tl.maximum/minimum, which drop a NaN: a NaN d must give a NaN logit
        lo = tl.where(b > a, a, b)
        same = a == b  # exp(hi) may be inf there: keep inf * 0 out of the side not taken
        half = tl.exp(0.5 * hi)  # exp(hi) = half^2: the product stays finite wherever it is (near-ties past ~88)
        magnitude = -s * (half * (half * _expm1(tl.where(same, -1.0, lo - hi))))
        return tl.where(same, 0.0, tl.where(b > a, magnitude, -magnitude))


@triton.jit
def _hinge(z):
    """relu(1 - z) and its derivative; a NaN z gives a NaN loss and slope -1, as relu and its backward do."""
    above = z >= 1.0
    return tl.where(above, 0.0, 1.0 - z), tl.where(above, 0.0, -1.0)


@triton.jit
def _mapo_phi(x):
    """phi(x) = x / (e^x - 1) and phi'(x), as mapo_phi in csrc/fdpo_math.h: the Bernoulli series to x^14 below
    |x| = 0.5; above it, for x > 0, x e^(-x/2) e^(-x/2) / (1 - e^-x) (no overflow where e^x does), x / expm1(x) for
    x < 0, and phi' = phi (1 - phi - x) / x."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    u = xs * xs
    phi_series = (
        1.0
        - 0.5 * xs
        + u
        * (
            1.0 / 12.0
            + u
            * (
                -1.0 / 720.0
                + u
                * (
                    1.0 / 30240.0
                    + u
                    * (-1.0 / 1209600.0 + u * (1.0 / 47900160.0 + u * (-691.0 / 1307674368000.0 + u / 74724249600.0)))
                )
            )
        )
    )
    slope_series = -0.5 + xs * (
        1.0 / 6.0
        + u
        * (
            -1.0 / 180.0
            + u
            * (
                1.0 / 5040.0
                + u * (-1.0 / 151200.0 + u * (1.0 / 4790016.0 + u * (-691.0 / 108972864000.0 + u / 5337446400.0)))
            )
        )
    )
    xl = tl.where(small, 1.0, x)  # the side not taken: never 0 / 0
    a = tl.abs(xl)
    h = tl.exp(-0.5 * a)
    phi_pos = (a * h) * h / -_expm1(-a)
    xn = tl.where(xl > 0, -1.0, xl)  # the x < 0 side's argument, kept off e^x's overflow where not taken
    phi_direct = tl.where(xl > 0, phi_pos, xn / _expm1(xn))
    slope_direct = phi_direct * ((1.0 - phi_direct - xl) / xl)
    return tl.where(small, phi_series, phi_direct), tl.where(small, slope_series, slope_direct)


@triton.jit
def _mapo_head(gap_w, gap_l, inv_w, inv_l, beta, beta_ts, mapo_snr, mapo_timesteps, red):
    """MaPO's head (twin of mapo_pair_head in csrc/fdpo_math.h): gap = e_ref - e = -e (the caller's cached reference
    errors are 0). Returns (x_w, x_l, phi_w, phi_l, z, loss, coef_w, coef_l), in fp32 as the C++ head: beta and
    beta_ts = beta T s (formed in fp64 by the launcher) are validated to fp32's range."""
    x_w = mapo_snr * -gap_w
    x_l = mapo_snr * -gap_l
    phi_w, slope_w = _mapo_phi(x_w)
    phi_l, slope_l = _mapo_phi(x_l)
    z = mapo_timesteps * (phi_w - phi_l)
    loss = -gap_w + beta * _softplus(-z)
    k = _sigmoid(-z) * beta_ts
    coef_w = (1.0 - k * slope_w) * (red * 2.0 * inv_w)
    coef_l = k * slope_l * (red * 2.0 * inv_l)
    return x_w, x_l, phi_w, phi_l, z, loss, coef_w, coef_l


@triton.jit
def _row_coef(g, sign, gamma_slope, d, log_clip, outer, inv):
    """g * sign * gamma slope * outer * inv (outer = beta/2 * w * red * 2, fp64) formed in fp64, as row_coef in
    csrc/fdpo_math.h: beta/2 * w alone may overflow fp32 where the coefficient does not. An infinite g (ipo past
    fp32) times a slope that underflowed at a finite log-ratio (truly > 0) is infinite, as in the reference."""
    gs = sign * gamma_slope.to(tl.float64)
    positive = ((d - d) == 0.0) & ((log_clip - log_clip) == 0.0)  # d and the clip's log-slope finite
    g_inf = (g == g) & ((g - g) != (g - g))
    gs = tl.where((gs == 0.0) & positive & g_inf, sign, gs)
    return _mul0(_mul0(g.to(tl.float64), gs), outer * inv.to(tl.float64)).to(tl.float32)


@triton.jit
def _soft_clip(d, clip):
    """d -> c*tanh(d/c) and log sech^2(d/c), both accurate to a few ulps for every |x| = |d/c|.

    Twin of soft_clip in csrc/fdpo_math.h: with t = exp(-2|x|), tanh|x| = -expm1(-2|x|) / (1 + t) (no
    cancellation for small |x|) and log sech^2 = log 4 - 2|x| - 2 log1p(t) (finite where sech^2 underflows);
    below |x| = 2^-12, tanh x = x to within half an ulp and d passes unchanged.
    """
    x = d / clip
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)  # in (0, 1]
    clipped = clip * (-_expm1(-2.0 * ax) / (1.0 + t))
    clipped = tl.where(ax < 2.44140625e-4, d, tl.where(x < 0, -clipped, clipped))
    return clipped, 1.3862943611198906 - 2.0 * ax - 2.0 * _log1p(t)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pair_rows(pair, num_pairs, INTERLEAVED: tl.constexpr):
    """Rows of the winner and of the loser of ``pair``."""
    if INTERLEAVED:
        return 2 * pair, 2 * pair + 1
    else:
        return pair, pair + num_pairs


@triton.jit
def _fold(x, BLOCK: tl.constexpr):
    """[BLOCK] -> [BLOCK // _FOLD]: sums of _FOLD neighbours (in order), inside a thread on the GPU."""
    return tl.sum(tl.reshape(x, [BLOCK // _FOLD, _FOLD]), axis=1)


@triton.jit
def _partials_kernel(
    pred_ptr,
    ref_ptr,
    target_ptr,
    mask_ptr,
    ws_ptr,
    num_pairs,
    row_len,
    chunk_len,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    SHARED_MASK: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
    CROSS: tl.constexpr,
):
    """Partial sums S, R, Q, M (docs/architecture.md) of one pair's two rows over one chunk of D; with CROSS (never
    with a mask) also X = sum (pred_w - t_w)(pred_l - t_l), the pair's cross term.

    Workspace ws[stat, row, chunk] (fp32); stats not needed (R, Q without ref_pred; M without mask) stay unset. X
    is stat 4 at the winner's row.
    """
    pair = tl.program_id(0).to(tl.int64)  # row * row_len may exceed 2^31
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    rows = 2 * num_pairs
    w_row, l_row = _pair_rows(pair, num_pairs, INTERLEAVED)
    w_off = w_row * row_len
    l_off = l_row * row_len
    if SHARED_TARGET:
        tw_off = pair * row_len
    else:
        tw_off = w_off
        tl_off = l_off
    if SHARED_MASK:
        mw_off = pair * row_len
    else:
        mw_off = w_off
        ml_off = l_off

    # Accumulators of [BLOCK // _FOLD]: each step's [BLOCK] terms are first summed over the _FOLD elements a thread
    # holds, so a statistic costs a thread 1 register, not 8 (sm_90 bf16: 72 -> 40 registers, 7 -> 12 resident
    # programs per SM, benchmarks/static_gate.py), and more warps keep loads in flight.
    ACC: tl.constexpr = BLOCK // _FOLD
    s_w = tl.zeros([ACC], tl.float32)
    s_l = tl.zeros([ACC], tl.float32)
    r_w = tl.zeros([ACC], tl.float32)
    r_l = tl.zeros([ACC], tl.float32)
    q_w = tl.zeros([ACC], tl.float32)
    q_l = tl.zeros([ACC], tl.float32)
    m_w = tl.zeros([ACC], tl.float32)
    m_l = tl.zeros([ACC], tl.float32)
    x_wl = tl.zeros([ACC], tl.float32)
    chunk_start = chunk * chunk_len
    # The last chunk stops at the row's end: no empty steps, and cols stays under row_len + BLOCK.
    for step in range(0, tl.minimum(chunk_len, row_len - chunk_start), BLOCK):
        cols = chunk_start + step + tl.arange(0, BLOCK)
        valid = cols < row_len
        # Casting at load: all arithmetic is fp32 whatever the storage dtype.
        p_w = tl.load(pred_ptr + w_off + cols, mask=valid, other=0.0).to(tl.float32)
        p_l = tl.load(pred_ptr + l_off + cols, mask=valid, other=0.0).to(tl.float32)
        t_w = tl.load(target_ptr + tw_off + cols, mask=valid, other=0.0).to(tl.float32)
        if SHARED_TARGET:
            t_l = t_w
        else:
            t_l = tl.load(target_ptr + tl_off + cols, mask=valid, other=0.0).to(tl.float32)
        e_w = p_w - t_w
        e_l = p_l - t_l
        if HAS_MASK:
            k_w = tl.load(mask_ptr + mw_off + cols, mask=valid, other=0.0).to(tl.float32)
            if SHARED_MASK:
                k_l = k_w
            else:
                k_l = tl.load(mask_ptr + ml_off + cols, mask=valid, other=0.0).to(tl.float32)
            m_w += _fold(k_w, BLOCK)
            m_l += _fold(k_l, BLOCK)
        else:
            k_w = 1.0
            k_l = 1.0
        s_w += _fold(k_w * e_w * e_w, BLOCK)
        s_l += _fold(k_l * e_l * e_l, BLOCK)
        if CROSS:
            x_wl += _fold(e_w * e_l, BLOCK)
        if HAS_REF:
            ref_w = tl.load(ref_ptr + w_off + cols, mask=valid, other=0.0).to(tl.float32)
            ref_l = tl.load(ref_ptr + l_off + cols, mask=valid, other=0.0).to(tl.float32)
            f_w = ref_w - t_w
            f_l = ref_l - t_l
            r_w += _fold(k_w * f_w * f_w, BLOCK)
            r_l += _fold(k_l * f_l * f_l, BLOCK)
            # e_ref - e summed directly as (ref - pred) * (ref + pred - 2 target) (spec §2): ref - pred is exact
            # when the two are close, where (ref - t) - (pred - t) would cancel the rounding of both.
            q_w += _fold(k_w * (ref_w - p_w) * (f_w + e_w), BLOCK)
            q_l += _fold(k_l * (ref_l - p_l) * (f_l + e_l), BLOCK)

    stat_stride = rows * num_chunks
    w_base = ws_ptr + w_row * num_chunks + chunk
    l_base = ws_ptr + l_row * num_chunks + chunk
    tl.store(w_base, tl.sum(s_w, axis=0))
    tl.store(l_base, tl.sum(s_l, axis=0))
    if HAS_REF:
        tl.store(w_base + stat_stride, tl.sum(r_w, axis=0))
        tl.store(l_base + stat_stride, tl.sum(r_l, axis=0))
        tl.store(w_base + 2 * stat_stride, tl.sum(q_w, axis=0))
        tl.store(l_base + 2 * stat_stride, tl.sum(q_l, axis=0))
    if HAS_MASK:
        tl.store(w_base + 3 * stat_stride, tl.sum(m_w, axis=0))
        tl.store(l_base + 3 * stat_stride, tl.sum(m_l, axis=0))
    if CROSS:
        tl.store(w_base + 4 * stat_stride, tl.sum(x_wl, axis=0))


@triton.jit
def _row_errors(
    ws_ptr,
    ref_err_ptr,
    rows_idx,
    valid,
    num_chunks,
    rows,
    row_count,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ERR_REDUCTION: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Chunk partials -> (e, e_ref, e_ref - e, inv) of the given rows, summing chunks in a fixed order.

    Chunks are read as [rows, BLOCK_C] tiles (contiguous per row): a few wide loads rather than one dependent
    load per chunk, which would make this single program latency-bound at hundreds of chunks. The tiles are
    accumulated elementwise and reduced once after the loop (a tl.sum inside it failed to compile, Triton 3.8).
    """
    stat_stride = rows * num_chunks
    s = tl.zeros([rows_idx.shape[0], BLOCK_C], tl.float32)
    r = tl.zeros([rows_idx.shape[0], BLOCK_C], tl.float32)
    q = tl.zeros([rows_idx.shape[0], BLOCK_C], tl.float32)
    m = tl.zeros([rows_idx.shape[0], BLOCK_C], tl.float32)
    for first in range(0, num_chunks, BLOCK_C):
        chunks = first + tl.arange(0, BLOCK_C)
        tile = ws_ptr + rows_idx[:, None] * num_chunks + chunks[None, :]
        in_tile = valid[:, None] & (chunks[None, :] < num_chunks)
        s += tl.load(tile, mask=in_tile, other=0.0)
        if HAS_REF:
            r += tl.load(tile + stat_stride, mask=in_tile, other=0.0)
            q += tl.load(tile + 2 * stat_stride, mask=in_tile, other=0.0)
        if HAS_MASK:
            m += tl.load(tile + 3 * stat_stride, mask=in_tile, other=0.0)
    if ERR_REDUCTION == _ERR_SUM:
        inv = tl.full(rows_idx.shape, 1.0, tl.float32)
    else:
        if HAS_MASK and ERR_REDUCTION == _ERR_MEAN:
            count = tl.sum(m, axis=1)
        else:
            count = tl.full(rows_idx.shape, 1.0, tl.float32) * row_count
        inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1e-30), 0.0)
    err = tl.sum(s, axis=1) * inv
    if HAS_REF:
        ref_err = tl.sum(r, axis=1) * inv
        gap = tl.sum(q, axis=1) * inv
    else:
        ref_err = tl.load(ref_err_ptr + rows_idx, mask=valid, other=0.0)
        gap = ref_err - err
    return err, ref_err, gap, inv


@triton.jit
def _pair_cross(ws_ptr, w_rows, valid, num_chunks, rows, BLOCK_C: tl.constexpr):
    """The cross term of the given pairs (stat 4 at the winners' rows), summing chunks in a fixed order."""
    x = tl.zeros([w_rows.shape[0], BLOCK_C], tl.float32)
    for first in range(0, num_chunks, BLOCK_C):
        chunks = first + tl.arange(0, BLOCK_C)
        tile = ws_ptr + 4 * rows * num_chunks + w_rows[:, None] * num_chunks + chunks[None, :]
        x += tl.load(tile, mask=valid[:, None] & (chunks[None, :] < num_chunks), other=0.0)
    return tl.sum(x, axis=1)


@triton.jit
def _head_kernel(
    ws_ptr,
    ref_err_ptr,
    pair_weight_ptr,
    loss_ptr,
    logits_ptr,
    stats_ptr,
    summary_ptr,
    coef_ptr,
    num_pairs,
    num_chunks,
    row_count,
    beta,
    alpha,
    gamma,
    label_smoothing,
    logratio_clip,
    DIVERGENCE: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ERR_REDUCTION: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    SMOOTHING: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    ipo_margin,
    dmpo_log_q,
    dmpo_log_1mq,
    mapo_snr,
    mapo_timesteps,
    mapo_beta_ts,
    INTERLEAVED: tl.constexpr,
    STRICT_TIES: tl.constexpr,
    CROSS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The per-pair head (twin of fdpo_pair_head), the stats, the summary and the loss, in one program."""
    rows = 2 * num_pairs
    if REDUCTION == _MEAN:
        red = 1.0 / num_pairs
    else:
        red = 1.0
    loss_total = tl.zeros([BLOCK_B], tl.float32)
    wins_total = tl.zeros([BLOCK_B], tl.float32)
    err_total = tl.zeros([BLOCK_B], tl.float32)
    ref_err_total = tl.zeros([BLOCK_B], tl.float32)
    cross_total = tl.zeros([BLOCK_B], tl.float32)
    for first in range(0, num_pairs, BLOCK_B):
        pairs = first + tl.arange(0, BLOCK_B)
        valid = pairs < num_pairs
        w_rows, l_rows = _pair_rows(pairs, num_pairs, INTERLEAVED)
        e_w, eref_w, gap_w, inv_w = _row_errors(
            ws_ptr, ref_err_ptr, w_rows, valid, num_chunks, rows, row_count, HAS_REF, HAS_MASK, ERR_REDUCTION, BLOCK_C
        )
        e_l, eref_l, gap_l, inv_l = _row_errors(
            ws_ptr, ref_err_ptr, l_rows, valid, num_chunks, rows, row_count, HAS_REF, HAS_MASK, ERR_REDUCTION, BLOCK_C
        )
        if LOSS_TYPE == _MAPO:  # reference-free: d = s e, reward = phi(s e) (stats as fdpo_pair_head)
            d_w, d_l, reward_w, reward_l, z, loss, coef_w, coef_l = _mapo_head(
                gap_w, gap_l, inv_w, inv_l, beta, mapo_beta_ts, mapo_snr, mapo_timesteps, red
            )
        else:
            half_beta_w = tl.cast(0.5 * beta, tl.float64)  # fp64: beta/2 * w may overflow fp32 where d does not
            if HAS_WEIGHT:
                half_beta_w = half_beta_w * tl.load(pair_weight_ptr + pairs, mask=valid, other=1.0).to(tl.float64)
            d_w = (half_beta_w * gap_w.to(tl.float64)).to(tl.float32)
            d_l = (half_beta_w * gap_l.to(tl.float64)).to(tl.float32)
            if HAS_CLIP:
                d_w, log_clip_w = _soft_clip(d_w, logratio_clip)
                d_l, log_clip_l = _soft_clip(d_l, logratio_clip)
            z = gamma * _psi_diff(d_w, d_l, alpha, DIVERGENCE)
            if LOSS_TYPE == _HINGE:
                loss, g = _hinge(z)
            elif LOSS_TYPE == _IPO:
                loss = (z - ipo_margin) * (z - ipo_margin)
                g = 2.0 * (z - ipo_margin)
            elif LOSS_TYPE == _DMPO:  # KL(p || q) in z as fdpo_pair_head: 1 - p = sigmoid(-z), p(1-p)(z - logit q)
                p_win = _sigmoid(z)
                p_lose = _sigmoid(-z)
                loss = _mul0(p_win, -_softplus(-z) - dmpo_log_q) + _mul0(p_lose, -_softplus(z) - dmpo_log_1mq)
                g = _mul0(p_win * p_lose, z - (dmpo_log_q - dmpo_log_1mq))
            else:
                # The smoothing term only where its weight is non-zero (0 * inf); label_smoothing < 0.5 is validated.
                loss = (1.0 - label_smoothing) * _softplus(-z)
                g = -(1.0 - label_smoothing) * _sigmoid(-z)
                if SMOOTHING:
                    loss += label_smoothing * _softplus(z)
                    g += label_smoothing * _sigmoid(z)
            outer = half_beta_w * red * 2.0
            if not HAS_CLIP:
                log_clip_w = tl.zeros_like(d_w)
                log_clip_l = tl.zeros_like(d_l)
            slope_w = _scaled_psi_slope(d_w, log_clip_w, alpha, DIVERGENCE)
            slope_l = _scaled_psi_slope(d_l, log_clip_l, alpha, DIVERGENCE)
            coef_w = _row_coef(g, -1.0, gamma * slope_w, d_w, log_clip_w, outer, inv_w)
            coef_l = _row_coef(g, 1.0, gamma * slope_l, d_l, log_clip_l, outer, inv_l)
            reward_w = _psi(d_w, alpha, DIVERGENCE)
            reward_l = _psi(d_l, alpha, DIVERGENCE)

        tl.store(logits_ptr + pairs, z, mask=valid)
        tl.store(coef_ptr + w_rows, coef_w, mask=valid)
        tl.store(coef_ptr + l_rows, coef_l, mask=valid)
        tl.store(stats_ptr + w_rows, e_w, mask=valid)
        tl.store(stats_ptr + l_rows, e_l, mask=valid)
        tl.store(stats_ptr + rows + w_rows, eref_w, mask=valid)
        tl.store(stats_ptr + rows + l_rows, eref_l, mask=valid)
        tl.store(stats_ptr + 2 * rows + w_rows, d_w, mask=valid)
        tl.store(stats_ptr + 2 * rows + l_rows, d_l, mask=valid)
        tl.store(stats_ptr + 3 * rows + w_rows, reward_w, mask=valid)
        tl.store(stats_ptr + 3 * rows + l_rows, reward_l, mask=valid)
        if REDUCTION == _NONE:
            tl.store(loss_ptr + pairs, loss, mask=valid)
        else:
            loss_total += tl.where(valid, loss, 0.0)
        if STRICT_TIES:
            win = tl.where(z > 0.0, 1.0, 0.0)
        else:
            win = tl.where(z > 0.0, 1.0, tl.where(z == 0.0, 0.5, 0.0))
        wins_total += tl.where(valid, win, 0.0)
        err_total += tl.where(valid, e_w + e_l, 0.0)
        ref_err_total += tl.where(valid, eref_w + eref_l, 0.0)
        if CROSS:
            cross_total += _pair_cross(ws_ptr, w_rows, valid, num_chunks, rows, BLOCK_C)
    if REDUCTION != _NONE:
        tl.store(loss_ptr, tl.sum(loss_total, axis=0) * red)
    tl.store(summary_ptr, tl.sum(wins_total, axis=0) / num_pairs)
    tl.store(summary_ptr + 1, tl.sum(err_total, axis=0) / rows)
    tl.store(summary_ptr + 2, tl.sum(ref_err_total, axis=0) / rows)
    tl.store(summary_ptr + 3, tl.sum(cross_total, axis=0))  # 0 unless CROSS


@triton.jit
def _backward_kernel(
    grad_ptr,
    grad_loss_ptr,
    pred_ptr,
    target_ptr,
    mask_ptr,
    coef_ptr,
    num_pairs,
    row_len,
    chunk_len,
    PER_PAIR_GRAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SHARED_TARGET: tl.constexpr,
    SHARED_MASK: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[row, j] = coef[row] * G[pair] * m[row, j] * (pred - target)[row, j], over one chunk of a row."""
    row = tl.program_id(0).to(tl.int64)  # row * row_len may exceed 2^31
    chunk = tl.program_id(1)
    if INTERLEAVED:
        pair = row // 2
    else:
        pair = row % num_pairs
    if PER_PAIR_GRAD:
        upstream = tl.load(grad_loss_ptr + pair)
    else:
        upstream = tl.load(grad_loss_ptr)
    # mul0 semantics (csrc/fdpo_math.h) throughout: 0 whenever a factor is 0, also times +-inf or NaN (an
    # overflowed coefficient times G = 0, a zero coefficient times G = inf, a zero scale times an infinite residual).
    scale = _mul0(tl.load(coef_ptr + row), upstream)
    row_off = row * row_len
    if SHARED_TARGET:
        t_off = pair * row_len
    else:
        t_off = row_off
    if SHARED_MASK:
        m_off = pair * row_len
    else:
        m_off = row_off
    chunk_start = chunk * chunk_len
    for step in range(0, tl.minimum(chunk_len, row_len - chunk_start), BLOCK):
        cols = chunk_start + step + tl.arange(0, BLOCK)
        valid = cols < row_len
        pred = tl.load(pred_ptr + row_off + cols, mask=valid, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + t_off + cols, mask=valid, other=0.0).to(tl.float32)
        grad = _mul0(scale, pred - target)
        if HAS_MASK:
            m = tl.load(mask_ptr + m_off + cols, mask=valid, other=0.0).to(tl.float32)
            grad = _mul0(grad, m)
        tl.store(grad_ptr + row_off + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Resident programs per SM of a compiled kernel variant, by (kernel, device, argument specialization, constexprs).
_RESIDENT: dict[tuple, int] = {}


def _resident_programs(kernel, device: torch.device, args: tuple, kwargs: dict) -> int:
    """Programs of ``kernel`` resident per SM on a CUDA ``device`` for these launch arguments: the CUDA occupancy
    rule on the compiled kernel's registers, warps and shared memory (sm_90 bf16 forward: 40 registers x 4 warps
    -> 12; backward 30 x 8 -> 8). Compiles the variant ahead of its launch (Triton's warmup, then cached)."""
    spec = tuple(
        a.dtype if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1) if isinstance(a, int) else a for a in args
    )
    key = (
        kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel),
        device.index,
        spec,
        tuple(sorted(kwargs.items())),
    )
    n = _RESIDENT.get(key)
    if n is None:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        if compiled is None:  # a cache hook or async compile deferred it: the grid of one program per SM and wave
            return 1
        compiled._init_handles()  # loads the module on the device: fills n_regs
        props = torch.cuda.get_device_properties(device)
        warps = compiled.metadata.num_warps
        regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // warps
        smem = compiled.metadata.shared
        by_smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // smem if smem else by_warps
        n = max(1, min(by_warps, by_regs, by_smem, 32))
        _RESIDENT[key] = n
    return n


def _split_rows(
    device: torch.device, row_len: int, programs_per_chunk: int, block: int, per_sm: int = 1
) -> tuple[int, int, int]:
    """(block, chunk_len, num_chunks): each row of ``row_len`` split in chunks, a multiple of ``block`` each.

    On CUDA, enough chunks for _WAVES waves of ``per_sm`` resident programs on every SM (programs_per_chunk *
    num_chunks >= _WAVES * per_sm * SMs), where rows are long enough; in the interpreter at most _CPU_MAX_CHUNKS.
    Chunk lengths are multiples of the block, so no program straddles two chunks.
    """
    if device.type == "cuda":
        wanted = triton.cdiv(_WAVES * per_sm * _sm_count(device.index), programs_per_chunk)
    else:
        block, wanted = _CPU_BLOCK, _CPU_MAX_CHUNKS
    num_chunks = min(wanted, triton.cdiv(row_len, block))
    chunk_len = triton.cdiv(triton.cdiv(row_len, num_chunks), block) * block
    return block, chunk_len, triton.cdiv(row_len, chunk_len)


def _device_context(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_row_length(row_len: int) -> None:
    # Column offsets are 32-bit (row offsets are 64-bit), with a block of headroom for the last step's tail.
    if row_len > _MAX_ROW_LEN:
        raise ValueError(f"backend='triton' supports up to {_MAX_ROW_LEN} elements per sample; got {row_len}")


def forward(model_pred, ref_pred, target, ref_err, mask, pair_weight, params: KernelParams):
    """Returns (loss, logits [B], sample_stats [4, 2B], summary [4], grad_coef [2B]), all fp32; 2 launches, no host
    sync. summary[3]: the cross term X with params.cross_term (refused with a mask), else 0."""
    rows, row_len = model_pred.shape
    num_pairs = rows // 2
    device = model_pred.device
    _check_row_length(row_len)
    f32 = dict(dtype=torch.float32, device=device)
    loss, logits, sample_stats, summary, grad_coef = empty_forward_outputs(model_pred, params.reduction)
    has_ref, has_mask = ref_pred is not None, mask is not None
    cross = bool(params.cross_term)
    if cross and has_mask:
        raise ValueError("fdiv_kernels (triton): cross_term is defined without a mask; got a mask")
    per_sm = 1
    if device.type == "cuda":  # the partials kernel's occupancy for this variant sizes its grid
        with _device_context(device):
            per_sm = _resident_programs(
                _partials_kernel,
                device,
                (
                    model_pred,
                    ref_pred if has_ref else model_pred,
                    target,
                    mask if has_mask else model_pred,
                    torch.float32,
                    num_pairs,
                    row_len,
                    _FWD_BLOCK,
                ),  # fmt: skip
                dict(
                    HAS_REF=has_ref,
                    HAS_MASK=has_mask,
                    SHARED_TARGET=target.shape[0] != rows,
                    SHARED_MASK=has_mask and mask.shape[0] != rows,
                    INTERLEAVED=params.interleaved,
                    BLOCK=_FWD_BLOCK,
                    CROSS=cross,
                    num_warps=_FWD_WARPS,
                ),  # fmt: skip
            )
    block, chunk_len, num_chunks = _split_rows(device, row_len, num_pairs, _FWD_BLOCK, per_sm)
    workspace = torch.empty(5 if cross else 4, rows, num_chunks, **f32)
    block_pairs = min(triton.next_power_of_2(num_pairs), _HEAD_MAX_BLOCK)
    # Absent optional tensors: any valid pointer; the constexpr flags keep the kernels from reading it.
    with _device_context(device):
        _partials_kernel[(num_pairs, num_chunks)](
            model_pred,
            ref_pred if has_ref else model_pred,
            target,
            mask if has_mask else model_pred,
            workspace,
            num_pairs,
            row_len,
            chunk_len,
            HAS_REF=has_ref,
            HAS_MASK=has_mask,
            SHARED_TARGET=target.shape[0] != rows,
            SHARED_MASK=has_mask and mask.shape[0] != rows,
            INTERLEAVED=params.interleaved,
            BLOCK=block,
            CROSS=cross,
            num_warps=_FWD_WARPS,
        )
        _head_kernel[(1,)](
            workspace,
            workspace if has_ref else ref_err,
            workspace if pair_weight is None else pair_weight,
            loss,
            logits,
            sample_stats,
            summary,
            grad_coef,
            num_pairs,
            num_chunks,
            float(row_len),
            float(params.beta),
            float(params.alpha),
            float(params.gamma),
            float(params.label_smoothing),
            float(params.logratio_clip),
            DIVERGENCE=params.divergence,
            REDUCTION=params.reduction,
            HAS_REF=has_ref,
            HAS_MASK=has_mask,
            HAS_WEIGHT=pair_weight is not None,
            ERR_REDUCTION=params.err_reduction,
            HAS_CLIP=params.logratio_clip > 0,
            SMOOTHING=params.label_smoothing > 0,
            LOSS_TYPE=params.loss_type,
            ipo_margin=float(params.ipo_margin),
            dmpo_log_q=float(params.dmpo_log_q),
            dmpo_log_1mq=float(params.dmpo_log_1mq),
            mapo_snr=float(params.mapo_snr),
            mapo_timesteps=float(params.mapo_timesteps),
            mapo_beta_ts=float(params.beta) * float(params.mapo_timesteps) * float(params.mapo_snr),
            INTERLEAVED=params.interleaved,
            STRICT_TIES=params.strict_ties,
            CROSS=cross,
            BLOCK_B=block_pairs,
            BLOCK_C=min(triton.next_power_of_2(num_chunks), _HEAD_TILE // block_pairs),
            num_warps=4,
        )
    return loss, logits, sample_stats, summary, grad_coef


def backward(grad_loss, model_pred, target, mask, grad_coef, interleaved: bool):
    """d loss / d model_pred in model_pred's dtype; 1 launch; grad_loss (0-dim or [B]) is read on the device."""
    rows, row_len = model_pred.shape
    num_pairs = rows // 2
    device = model_pred.device
    _check_row_length(row_len)
    grad = torch.empty_like(model_pred)
    has_mask = mask is not None
    per_sm = 1
    if device.type == "cuda":  # the backward kernel's occupancy for this variant sizes its grid
        with _device_context(device):
            per_sm = _resident_programs(
                _backward_kernel,
                device,
                (
                    grad,
                    torch.float32,
                    model_pred,
                    target,
                    mask if has_mask else model_pred,
                    grad_coef,
                    num_pairs,
                    row_len,
                    _BWD_BLOCK,
                ),  # fmt: skip
                dict(
                    PER_PAIR_GRAD=grad_loss.dim() == 1,
                    HAS_MASK=has_mask,
                    SHARED_TARGET=target.shape[0] != rows,
                    SHARED_MASK=has_mask and mask.shape[0] != rows,
                    INTERLEAVED=interleaved,
                    BLOCK=_BWD_BLOCK,
                    num_warps=_BWD_WARPS,
                ),  # fmt: skip
            )
    block, chunk_len, num_chunks = _split_rows(device, row_len, rows, _BWD_BLOCK, per_sm)
    with _device_context(device):
        _backward_kernel[(rows, num_chunks)](
            grad,
            grad_loss.to(torch.float32),
            model_pred,
            target,
            mask if has_mask else model_pred,
            grad_coef,
            num_pairs,
            row_len,
            chunk_len,
            PER_PAIR_GRAD=grad_loss.dim() == 1,
            HAS_MASK=has_mask,
            SHARED_TARGET=target.shape[0] != rows,
            SHARED_MASK=has_mask and mask.shape[0] != rows,
            INTERLEAVED=interleaved,
            BLOCK=block,
            num_warps=_BWD_WARPS,
        )
    return grad
