"""Argument checks shared by the fused loss and the reference: bad input gets a clear error, never a wrong answer."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np
import torch

from .divergences import Divergence, get_divergence
from .options import DEFAULTS, HEADS, OP_FLOATS, OP_INTS, OPTIONS, choices, ids

REDUCTIONS = ids("reduction")
# Per-sample error: masked mean, sum, or mean over all elements (sum m r^2 / D, e.g. SimpleTuner's norm_type="mean").
ERR_REDUCTIONS = ids("err_reduction")
LOSS_TYPES = ids("loss_type")  # diffusers' --loss_type and the other pair heads (options.HEADS), kernel ids
MAPO_DEFAULTS = {"mapo_snr": 0.5, "mapo_timesteps": 1000.0}  # mapo-t2i/mapo args.py --snr_value; SD's T
LAYOUTS = choices("layout")
BETA_CONVENTIONS = choices("beta_convention")
ACC_TIE_RULES = choices("implicit_acc_ties")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_FLOAT32_MAX = 3.4028234663852886e38
# Real scalars a user may pass (NumPy's too: beta=np.float32(...) from a config file). Not numbers.Real: Dynamo
# traces a plain isinstance on classes without a graph break.
_REAL_TYPES = (int, float, np.integer, np.floating)


@dataclass(frozen=True)
class FDPOConfig:
    """The validated scalar configuration of the loss, built once (``FDPOLoss``) or cached (``fused_fdpo_loss``).

    ``beta`` is in the "half" convention, ``d = beta / 2 * w * (e_ref - e)``, whatever ``beta_convention`` the
    user passed. Ids match the kernels (csrc/fdpo_math.h).
    """

    beta: float
    divergence: Divergence
    gamma: float
    label_smoothing: float
    err_reduction: str
    logratio_clip: float | None
    reduction: str
    layout: str
    implicit_acc_ties: str
    loss_type: str
    ipo_margin: float  # 1 / (2 ipo_tau)
    dmpo_alpha: float | None = None  # loss_type "dmpo": q = 1 - dmpo_alpha
    mapo_snr: float = 0.0  # loss_type "mapo": s and T (0 for other loss types)
    mapo_timesteps: float = 0.0
    sdpo_mu: float | None = None  # Diffusion-SDPO's winner-preserving mu; None: off
    # The op's packed configuration (fparams, iparams), built once here: options.OP_FLOATS / OP_INTS.
    _op: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        values = {
            "beta": self.beta,
            "divergence": self.divergence.id,
            "alpha": self.divergence.alpha,
            "gamma": self.gamma,
            "label_smoothing": self.label_smoothing,
            "err_reduction": ERR_REDUCTIONS[self.err_reduction],
            "logratio_clip": self.logratio_clip or 0.0,  # <= 0: off
            "reduction": REDUCTIONS[self.reduction],
            "loss_type": LOSS_TYPES[self.loss_type],
            "ipo_margin": self.ipo_margin,
            # log q and log(1 - q) in float64 here (log1p: exact for small alpha), not in the fp32 kernels
            "dmpo_log_q": math.log1p(-self.dmpo_alpha) if self.dmpo_alpha is not None else 0.0,
            "dmpo_log_1mq": math.log(self.dmpo_alpha) if self.dmpo_alpha is not None else 0.0,
            "mapo_snr": self.mapo_snr,
            "mapo_timesteps": self.mapo_timesteps,
            "interleaved": self.interleaved,
            "strict_ties": self.implicit_acc_ties == "strict",
            # the SDPO safeguard's g_l . g_w, reduced by the forward pass itself (heads.sdpo_lambda)
            "cross_term": self.sdpo_mu is not None,
        }
        packed = ([float(values[k]) for k in OP_FLOATS], [int(values[k]) for k in OP_INTS])
        object.__setattr__(self, "_op", packed)

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    def op_scalars(self) -> tuple[list[float], list[int]]:
        """The configuration arguments of fdiv_kernels::fdpo_forward: ``(fparams, iparams)``, laid out as
        options.OP_FLOATS / OP_INTS (shared lists: do not modify)."""
        return self._op


def make_config(**options) -> FDPOConfig:
    """Validate the loss's options (options.LossOptions; unset ones take their defaults) into the frozen config."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {list(OPTIONS)}")
    return _checked_config(**{**DEFAULTS, **options})


def _checked_config(
    *,
    beta,
    divergence,
    alpha,
    gamma,
    label_smoothing,
    err_reduction,
    layout,
    beta_convention,
    logratio_clip,
    reduction,
    implicit_acc_ties,
    loss_type,
    ipo_tau,
    dmpo_alpha,
    mapo_snr,
    mapo_timesteps,
    sdpo_mu,
) -> FDPOConfig:
    """Validate the loss's scalar arguments (errors name the argument) and return the frozen config."""
    div = get_divergence(divergence, alpha)
    beta_convention = _choice("beta_convention", beta_convention, BETA_CONVENTIONS)
    beta = _finite_float("beta", beta, positive=True)
    if beta_convention == "full":  # d = beta * (e_ref - e), as diffusers' SD1.5 script writes it
        beta = 2.0 * beta
    if beta / 2 > _FLOAT32_MAX:  # beta / 2 is a float32 factor in the kernels: past this it is inf and d is NaN
        raise ValueError(
            f"beta={beta / (2.0 if beta_convention == 'full' else 1.0):g} with beta_convention="
            f"{beta_convention!r} gives beta/2 = {beta / 2:g} per unit of error gap, beyond float32's range "
            f"({_FLOAT32_MAX:.4g}) in which the kernels compute; pass a smaller beta"
        )
    eps = _finite_float("label_smoothing", label_smoothing)
    if not (0.0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5) (conservative DPO's eps); got {eps}")
    if loss_type == "kto":
        raise ValueError(
            "loss_type='kto' takes unpaired rows with labels: call fdiv_kernels.fused_kto_loss(model_pred, ref_pred, "
            "target, labels=...) instead of fused_fdpo_loss"
        )
    loss_type = _choice("loss_type", loss_type, choices("loss_type"))
    _check_head_options(
        loss_type,
        label_smoothing=eps,
        ipo_tau=ipo_tau,
        dmpo_alpha=dmpo_alpha,
        mapo_snr=mapo_snr,
        mapo_timesteps=mapo_timesteps,
    )
    gamma = _finite_float("gamma", gamma, positive=True, float32=True)
    mapo = _mapo_options(
        loss_type,
        mapo_snr,
        mapo_timesteps,
        divergence=div,
        gamma=gamma,
        clip=logratio_clip,
        beta_convention=beta_convention,
        beta=beta,
    )
    return FDPOConfig(
        beta=beta,
        divergence=div,
        gamma=gamma,
        label_smoothing=eps,
        err_reduction=_choice("err_reduction", err_reduction, tuple(ERR_REDUCTIONS)),
        logratio_clip=_finite_float("logratio_clip", logratio_clip, positive=True, allow_none=True, float32=True),
        reduction=_choice("reduction", reduction, tuple(REDUCTIONS)),
        layout=_choice("layout", layout, LAYOUTS),
        implicit_acc_ties=_choice("implicit_acc_ties", implicit_acc_ties, ACC_TIE_RULES),
        loss_type=loss_type,
        ipo_margin=_ipo_margin(loss_type, ipo_tau),
        dmpo_alpha=_dmpo_alpha(loss_type, dmpo_alpha),
        mapo_snr=mapo["mapo_snr"],
        mapo_timesteps=mapo["mapo_timesteps"],
        sdpo_mu=_sdpo_mu(loss_type, sdpo_mu),
    )


def _check_head_options(loss_type: str, **values) -> None:
    """An option that belongs to another head (options.HEADS) and is set: an error naming both."""
    for head_name, head in HEADS.items():
        for name in head.options:
            if head_name != loss_type and values[name] != DEFAULTS[name]:
                raise ValueError(
                    f"{name} is used by loss_type={head_name!r} only; got loss_type={loss_type!r} with "
                    f"{name}={values[name]!r}"
                )


def _ipo_margin(loss_type: str, ipo_tau) -> float:
    """1 / (2 ipo_tau) of loss_type "ipo" (0 otherwise)."""
    if loss_type != "ipo":
        return 0.0
    if ipo_tau is None:
        raise ValueError(
            "loss_type='ipo' needs ipo_tau, its regularization: loss = (z - 1 / (2 ipo_tau))^2 "
            "(see docs/dropin.md for diffusers' --loss_type ipo)"
        )
    ipo_margin = 1.0 / (2.0 * _finite_float("ipo_tau", ipo_tau, positive=True))
    if ipo_margin * ipo_margin > _FLOAT32_MAX:  # the loss (z - margin)^2 would be +inf for every z
        raise ValueError(
            f"ipo_tau={ipo_tau:g} gives a margin 1/(2 ipo_tau) = {ipo_margin:g} whose square, the ipo loss, is "
            f"beyond float32's range ({_FLOAT32_MAX:.4g}); pass ipo_tau >= {0.5 / _FLOAT32_MAX**0.5:.3g}"
        )
    return ipo_margin


def _dmpo_alpha(loss_type: str, dmpo_alpha) -> float | None:
    if loss_type != "dmpo":
        return None
    if dmpo_alpha is None:
        raise ValueError(
            "loss_type='dmpo' needs dmpo_alpha in (0, 1): loss = KL(p || q), p = sigmoid(z), q = 1 - dmpo_alpha "
            "(Diffusion-SDPO's --dmpo_alpha; its script uses 0.01)"
        )
    dmpo_alpha = _finite_float("dmpo_alpha", dmpo_alpha)
    if not (0.0 < dmpo_alpha < 1.0):
        raise ValueError(
            f"dmpo_alpha must be in (0, 1) (the target q = 1 - dmpo_alpha needs log q and log(1 - q)); got {dmpo_alpha}"
        )
    return dmpo_alpha


def _sdpo_mu(loss_type: str, sdpo_mu) -> float | None:
    if sdpo_mu is None:
        return None
    sdpo_mu = _finite_float("sdpo_mu", sdpo_mu)
    if not (0.0 <= sdpo_mu <= 1.0):
        raise ValueError(f"sdpo_mu must be in [0, 1] (Diffusion-SDPO's --winner_preserving_mu); got {sdpo_mu}")
    if loss_type == "mapo":
        raise ValueError("sdpo_mu applies to the reference-based pair losses, not to loss_type='mapo'")
    return sdpo_mu


def _mapo_options(loss_type, snr, timesteps, *, divergence, gamma, clip, beta_convention, beta) -> dict:
    """MaPO's s and T (its defaults where None; 0 for other loss types), and the options MaPO has no use for
    refused by name: it has no reference, so no log-ratio for a divergence, a clip or a logit scale. beta and
    beta T s (the gradient's scale) must be within float32's range: the kernels' MaPO head computes in float32."""
    given = {"mapo_snr": snr, "mapo_timesteps": timesteps}
    if loss_type != "mapo":
        return {name: 0.0 for name in given}
    unused = {
        "divergence": divergence.name != "reverse_kl",
        "gamma": gamma != 1.0,
        "logratio_clip": clip is not None,
        "beta_convention": beta_convention != "half",
    }
    for name, is_set in unused.items():
        if is_set:
            raise ValueError(
                f"loss_type='mapo' is reference-free (MaPO: e_w - beta * log sigmoid(T (phi(s e_w) - phi(s e_l)))): "
                f"it has no reference log-ratio for {name} to act on; leave {name} at its default"
            )
    values = {
        name: _finite_float(name, MAPO_DEFAULTS[name] if value is None else value, positive=True, float32=True)
        for name, value in given.items()
    }
    scale = beta * values["mapo_snr"] * values["mapo_timesteps"]
    if beta > _FLOAT32_MAX or scale > _FLOAT32_MAX:
        raise ValueError(
            f"loss_type='mapo' with beta={beta:g}, mapo_snr={values['mapo_snr']:g}, mapo_timesteps="
            f"{values['mapo_timesteps']:g}: beta and beta * mapo_snr * mapo_timesteps ({scale:g}), the gradient's "
            f"scale, must be within float32's range ({_FLOAT32_MAX:.4g}), in which the kernels compute"
        )
    return values


_cached_config = functools.lru_cache(maxsize=512, typed=True)(make_config)


def config_for(options: dict) -> FDPOConfig:
    """``make_config(**options)`` through a cache: a training loop pays for validation once per distinct config."""
    if torch.compiler.is_compiling():  # traced once per graph anyway; Dynamo warns about cache wrappers
        return make_config(**options)
    try:
        return _cached_config(**options)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return make_config(**options)  # e.g. a tensor passed as beta: the uncached call raises the clear error


@dataclass(frozen=True)
class FDPOProblem:
    """Validated arguments of one loss call: the config and the tensors, untouched (no copies made here)."""

    config: FDPOConfig
    model_pred: torch.Tensor
    ref_pred: torch.Tensor | None
    target: torch.Tensor
    ref_err: torch.Tensor | None
    mask: torch.Tensor | None
    pair_weight: torch.Tensor | None
    num_pairs: int


# For the type checker: a float, or float | None where allow_none may pass None through.
@overload
def _finite_float(
    name: str, value, *, positive: bool = ..., allow_none: Literal[False] = ..., float32: bool = ...
) -> float: ...
@overload
def _finite_float(name: str, value, *, positive: bool = ..., allow_none: bool, float32: bool = ...) -> float | None: ...
def _finite_float(
    name: str, value, *, positive: bool = False, allow_none: bool = False, float32: bool = False
) -> float | None:
    """A real number (Python or NumPy scalar; not a bool, not a tensor, which would need a host sync) as float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, _REAL_TYPES):
        hint = " (pass a Python number: a tensor would need a host sync)" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}{hint}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if float32 and abs(value) > _FLOAT32_MAX:
        raise ValueError(
            f"{name}={value:g} is beyond float32's range ({_FLOAT32_MAX:.4g}), in which the kernels compute"
        )
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")
    return value


def _check_layout(name: str, t: torch.Tensor) -> None:
    """A plain dense tensor: the kernels read strided memory, and their autograd.Function (hand-written backward)
    cannot run under torch.func transforms."""
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; pass a dense one (e.g. {name}.to_padded_tensor(0.0) with a mask)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; pass a dense tensor ({name}.to_dense())")
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise TypeError(
            f"{name} comes from a torch.func transform (grad, vmap, jacrev, ...), which the loss does not support "
            "(its backward is hand-written); use loss.backward() or torch.autograd.grad"
        )


def _check_fits_float32(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """A float64 [2B]/[B] vector beside a lower-precision model_pred is rounded to float32, in which the kernels
    compute: a finite value beyond float32's range would become inf (and d NaN). Refused, naming it; this check
    syncs with the device, and only in this mixed case."""
    if t.dtype != torch.float64 or ref.dtype == torch.float64 or torch.compiler.is_compiling():
        return
    beyond = (t.abs() > _FLOAT32_MAX) & t.isfinite()
    if bool(beyond.any()):
        raise ValueError(
            f"{name} holds {t[beyond][0].item():g}, beyond float32's range ({_FLOAT32_MAX:.4g}), in which the loss "
            f"computes for {ref.dtype} model_pred; rescale it or pass a float64 model_pred"
        )


def _check_tensor(name: str, t, ref: torch.Tensor, *, elementwise: bool = True) -> None:
    """An input beside model_pred. Elementwise inputs (ref_pred, target, mask) may each have their own dtype
    (mixed precision: the kernels read each in its own dtype and compute in model_pred's accumulate dtype), but
    float64 only beside a float64 model_pred: the kernels would otherwise round it to float32."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    _check_layout(name, t)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but model_pred is on {ref.device}; move it with .to({ref.device!s})")
    if not t.dtype.is_floating_point:
        cast = f": pass {name}.to(model_pred.dtype)" if t.dtype == torch.bool else ""
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}{cast}")
    if elementwise and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {t.dtype}")
    if elementwise and t.dtype == torch.float64 and ref.dtype != torch.float64:
        raise TypeError(
            f"{name} is float64 but model_pred is {ref.dtype}: the loss computes in float32 for {ref.dtype} "
            f"inputs; pass {name}.to(model_pred.dtype), or a float64 model_pred for float64 arithmetic"
        )
    if t.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the loss back-propagates into model_pred only; pass {name}.detach() "
            "(compute the reference under torch.no_grad())"
        )


def check_inputs(config: FDPOConfig, model_pred, ref_pred, target, ref_err, mask, pair_weight) -> int:
    """Check the tensors of one call against each other and the config; returns the number of pairs B."""
    if not isinstance(model_pred, torch.Tensor):
        raise TypeError(f"model_pred must be a torch.Tensor; got {type(model_pred).__name__}")
    _check_layout("model_pred", model_pred)
    if model_pred.dtype not in FLOAT_DTYPES:
        raise TypeError(f"model_pred must be float32, float16, bfloat16 or float64; got {model_pred.dtype}")
    if model_pred.dim() < 2:
        raise ValueError(
            f"model_pred must have shape [2B, ...] with at least one dim per sample; got {tuple(model_pred.shape)}"
        )
    rows = model_pred.shape[0]
    layout = config.layout
    if rows == 0 or rows % 2:
        raise ValueError(
            f"model_pred has {rows} rows; the paired layout ({layout}: "
            + ("rows 0..B-1 winners, B..2B-1 losers" if layout == "halves" else "rows [w0, l0, w1, l1, ...]")
            + ") needs an even, non-zero first dim 2B"
        )
    num_pairs = rows // 2
    sample_shape = model_pred.shape[1:]
    if model_pred.numel() == 0:
        raise ValueError(f"model_pred has no elements per sample: shape {tuple(model_pred.shape)}")
    acc_tiny = torch.finfo(torch.float64 if model_pred.dtype == torch.float64 else torch.float32).tiny
    if config.logratio_clip is not None and config.logratio_clip < acc_tiny:
        # In the accumulate dtype such a clip is subnormal or 0, and 0 means "no clip": refused, not ignored.
        raise ValueError(
            f"logratio_clip={config.logratio_clip:g} is below the smallest normal number ({acc_tiny:.4g}) of the "
            f"dtype the loss computes in for {model_pred.dtype} model_pred; pass a larger clip"
        )

    _check_reference_side(config, model_pred, ref_pred, ref_err, mask, pair_weight, rows)

    if target is None:
        raise ValueError(
            "target is required: the denoising target (noise, v or flow), shape [2B, ...] or shared [B, ...]"
        )
    _check_tensor("target", target, model_pred)
    if target.shape[1:] != sample_shape or target.shape[0] not in (rows, num_pairs):
        raise ValueError(
            f"target has shape {tuple(target.shape)}; expected {(rows, *sample_shape)} (one per sample) or "
            f"{(num_pairs, *sample_shape)} (shared by winner and loser of each pair, {layout} layout)"
        )
    if mask is not None:
        _check_tensor("mask", mask, model_pred)
        if mask.shape[1:] != sample_shape or mask.shape[0] not in (rows, num_pairs):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected {(rows, *sample_shape)} or shared "
                f"{(num_pairs, *sample_shape)} ({layout} layout)"
            )
    if pair_weight is not None:
        _check_tensor("pair_weight", pair_weight, model_pred, elementwise=False)
        if pair_weight.shape != (num_pairs,):
            raise ValueError(
                f"pair_weight must have shape [B] = ({num_pairs},), one weight per pair; got {tuple(pair_weight.shape)}"
            )
        _check_fits_float32("pair_weight", pair_weight, model_pred)
    return num_pairs


def _check_reference_side(config: FDPOConfig, model_pred, ref_pred, ref_err, mask, pair_weight, rows: int) -> None:
    """The reference (MaPO has none: one given anyway is a mistake, not something to ignore), and the inputs a
    head does not define."""
    if config.loss_type != "mapo":
        _check_reference(model_pred, ref_pred, ref_err, rows, config.layout)
    else:
        for name, t in (("ref_pred", ref_pred), ("ref_err", ref_err)):
            if t is not None:
                raise ValueError(
                    f"loss_type='mapo' is reference-free (MaPO needs no reference model); got {name}: drop it (or "
                    "choose a reference-based loss_type such as 'sigmoid')"
                )
        if pair_weight is not None:
            raise ValueError("pair_weight is not defined for loss_type='mapo' (MaPO weighs every pair equally)")
    if config.sdpo_mu is not None and mask is not None:
        raise ValueError(
            "sdpo_mu with a mask is not supported: Diffusion-SDPO's safeguard is defined on the unmasked errors "
            "(pass mask=None, or drop sdpo_mu)"
        )


def _check_reference(model_pred, ref_pred, ref_err, rows: int, layout: str) -> None:
    """check_inputs's reference side: exactly one of ref_pred [2B, ...] and ref_err [2B], each checked."""
    if (ref_pred is None) == (ref_err is None):
        raise ValueError(
            "pass exactly one of ref_pred (reference model predictions, [2B, ...]) and ref_err "
            "(cached reference errors, [2B]); got " + ("both" if ref_pred is not None else "neither")
        )
    if ref_pred is not None:
        _check_tensor("ref_pred", ref_pred, model_pred)
        if ref_pred.shape != model_pred.shape:
            raise ValueError(
                f"ref_pred has shape {tuple(ref_pred.shape)} but model_pred has {tuple(model_pred.shape)}; "
                "they must match"
            )
    if ref_err is not None:
        _check_tensor("ref_err", ref_err, model_pred, elementwise=False)
        if ref_err.shape != (rows,):
            order = "winners first, then losers" if layout == "halves" else "[w0, l0, w1, l1, ...]"
            raise ValueError(
                f"ref_err must have shape [2B] = ({rows},), one error per sample in model_pred's row order "
                f"({layout} layout: {order}); got {tuple(ref_err.shape)}"
            )
        _check_fits_float32("ref_err", ref_err, model_pred)


def validate(model_pred, ref_pred, target, *, ref_err, mask, pair_weight, **options) -> FDPOProblem:
    """Config and tensor checks of one call (the reference's entry point; the fused loss caches the config)."""
    config = make_config(**options)
    num_pairs = check_inputs(config, model_pred, ref_pred, target, ref_err, mask, pair_weight)
    return FDPOProblem(config, model_pred, ref_pred, target, ref_err, mask, pair_weight, num_pairs)
