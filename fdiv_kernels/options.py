"""The loss's options, declared once: name, default, allowed values and doc of each.

``fused_fdpo_loss``, ``FDPOLoss`` and ``fdpo_loss_reference`` take these by keyword; their signatures and the
``Args`` of their docstrings are generated from :class:`LossOptions` (``with_options``), and
``_validation.make_config`` validates them into the frozen ``FDPOConfig`` the kernels get. An option the kernels
read is a field here, its check and packed value in ``_validation.py`` (``make_config``, ``FDPOConfig``), an entry
in ``OP_FLOATS`` / ``OP_INTS`` (and its twin in csrc/fdpo_op.h), and its math in the kernels and the reference;
never the signatures. tests/test_errors.py checks the three signatures and docstrings against this class.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass, field, fields

from .divergences import DIVERGENCES


def _option(default, doc: str, choices: tuple | None = None):
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True)
class Head:
    """One pair loss of ``loss_type``: what it computes, where, from what, and the options that belong to it."""

    loss: str  # the per-pair loss (docs)
    derivative: str  # what the backward's per-row coefficient comes from (docs)
    logs: str  # what FDPOStats holds for it beyond the common statistics (docs)
    source: str  # the authors' code it reproduces
    reference: bool = True  # needs ref_pred or ref_err
    options: tuple = ()  # the options only this head reads (set for another head: an error naming both)


# The table of pair heads, in the kernels' id order (csrc/fdpo_math.h LossType, the Triton constants; tests/
# test_ops.py compares); each is evaluated in the kernels' pair epilogue. docs/api.md's table of heads is
# generated from it (tests/test_ops.py). Unpaired Diffusion-KTO is fused_kto_loss (heads.py), not a pair head.
HEADS: dict[str, Head] = {
    "sigmoid": Head(
        "-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)",
        "dL/dz in the epilogue",
        "-",
        "Diffusion-DPO; diffusers train_diffusion_dpo*.py --loss_type sigmoid",
        options=("label_smoothing",),
    ),
    "hinge": Head("relu(1 - z)", "dL/dz in the epilogue", "-", "diffusers train_diffusion_dpo.py --loss_type hinge"),
    "ipo": Head(
        "(z - 1 / (2 ipo_tau))^2",
        "dL/dz in the epilogue",
        "-",
        "diffusers train_diffusion_dpo.py --loss_type ipo",
        options=("ipo_tau",),
    ),
    "dmpo": Head(
        "KL(p ‖ q), p = sigmoid(z), q = 1 - dmpo_alpha",
        "dL/dz = p (1 - p) (z - logit q) in the epilogue",
        "-",
        "AIDC-AI/Diffusion-SDPO@84fb241 train.py:1220-1233",
        options=("dmpo_alpha",),
    ),
    "mapo": Head(
        "e_w - beta log sigmoid(T (phi(s e_w) - phi(s e_l))), phi(x) = x / (e^x - 1)",
        "dL/de_w = 1 - beta sigmoid(-z) T s phi'(s e_w), dL/de_l = beta sigmoid(-z) T s phi'(s e_l) in the "
        "epilogue (the kernels read ref_err = 0)",
        "logratio = s e, reward = phi(s e) (MaPO's Win/Lose Score); ref_err = 0",
        "mapo-t2i/mapo@374b3d3 utils.py:286-301",
        reference=False,
        options=("mapo_snr", "mapo_timesteps"),
    ),
}


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of the loss, in the order help() shows them. ``choices`` are listed in id order where the
    kernels take an id (csrc/fdpo_math.h; tests/test_ops.py compares)."""

    beta: float = _option(
        5000.0,
        'Diffusion-DPO beta; ``d = beta/2 * w * (e_ref - e)`` (``beta_convention="half"``, original code and '
        "diffusers' SDXL script) or ``d = beta * (e_ref - e)`` (``\"full\"``, diffusers' SD1.5 script).",
    )
    divergence: str = _option(
        "reverse_kl",
        "``reverse_kl`` (Diffusion-DPO), ``forward_kl``, ``js``, ``alpha``, ``hellinger``.",
        tuple(DIVERGENCES),
    )
    alpha: float = _option(0.5, 'the alpha of ``divergence="alpha"``, in (0, 1).')
    gamma: float = _option(1.0, "outer scale of the logit ``z = gamma * (psi(d_w) - psi(d_l))``.")
    label_smoothing: float = _option(0.0, "conservative-DPO eps in [0, 0.5).")
    err_reduction: str = _option(
        "mean",
        "per-sample error as the ``mean`` over elements (default; with a mask, the masked mean), their ``sum``, "
        "or ``mean_all``: the masked sum over all elements divided by their count (trainers that average "
        '``err * mask`` over every element, e.g. SimpleTuner\'s ``norm_type="mean"``).',
        ("mean", "sum", "mean_all"),
    )
    layout: str = _option(
        "halves",
        "``halves`` (rows ``[w; l]``) or ``interleaved`` (rows ``[w0, l0, w1, l1, ...]``).",
        ("halves", "interleaved"),
    )
    beta_convention: str = _option("half", "``half`` or ``full``: see ``beta``.", ("half", "full"))
    logratio_clip: float | None = _option(None, "``c`` > 0 soft-clamps ``d -> c * tanh(d / c)``.")
    reduction: str = _option(
        "mean", "``mean`` (default), ``sum`` or ``none`` (per-pair ``[B]``).", ("none", "mean", "sum")
    )
    implicit_acc_ties: str = _option(
        "half", "``half`` (ties count 1/2, diffusers SDXL) or ``strict`` (original code).", ("half", "strict")
    )
    loss_type: str = _option(
        "sigmoid",
        "the pair loss (``HEADS``): ``sigmoid`` (default, ``-log sigmoid(z)``; diffusers' ``--loss_type``), "
        "``hinge`` (``relu(1 - z)``), ``ipo`` (``(z - 1 / (2 ipo_tau))^2``), ``dmpo`` (DMPO: ``KL(p || q)`` of "
        "Bernoulli ``p = sigmoid(z)`` and ``q = 1 - dmpo_alpha``) or ``mapo`` (MaPO, reference-free: "
        "``e_w - beta * log sigmoid(T (phi(s e_w) - phi(s e_l)))``, ``phi(x) = x / (e^x - 1)``; no ``ref_pred``).",
        tuple(HEADS),
    )
    ipo_tau: float | None = _option(None, 'the regularization of ``loss_type="ipo"``.')
    dmpo_alpha: float | None = _option(
        None, 'the alpha of ``loss_type="dmpo"``, in (0, 1): the target win probability is ``q = 1 - dmpo_alpha``.'
    )
    mapo_snr: float | None = _option(
        None, "the ``s`` of ``loss_type=\"mapo\"`` (MaPO's ``--snr_value``), > 0; None: MaPO's default 0.5."
    )
    mapo_timesteps: float | None = _option(
        None,
        "the ``T`` of ``loss_type=\"mapo\"`` (the scheduler's ``num_train_timesteps``), > 0; None: MaPO's 1000.",
    )
    sdpo_mu: float | None = _option(
        None,
        "Diffusion-SDPO's winner-preserving safeguard, mu in [0, 1]: the losers' gradient is scaled by "
        "``lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w), 0, 1)`` (1 where ``g_l . g_w <= 0``), ``g`` the "
        "gradients of the batch-mean winner and loser errors; the loss value is unchanged. None: off.",
    )


OPTIONS: dict = {f.name: f for f in fields(LossOptions)}
DEFAULTS: dict = {name: f.default for name, f in OPTIONS.items()}


def heads_table() -> str:
    """docs/api.md's table of the pair heads, from ``HEADS``."""
    rows = [
        "| `loss_type=` | per-pair loss | backward coefficient from | also logs | options | reference | reproduces |"
    ]
    rows.append("|---|---|---|---|---|---|---|")
    for name, h in HEADS.items():
        options = ", ".join(f"`{o}`" for o in h.options) or "-"
        reference = "needed" if h.reference else "none"
        rows.append(f"| `{name}` | `{h.loss}` | {h.derivative} | {h.logs} | {options} | {reference} | {h.source} |")
    return "\n".join(rows)


def choices(name: str) -> tuple:
    return OPTIONS[name].metadata["choices"]


def ids(name: str) -> dict[str, int]:
    """The kernels' id of each allowed value of option ``name`` (its position in ``choices``)."""
    return {value: i for i, value in enumerate(choices(name))}


# The op's configuration (fdiv_kernels::fdpo_forward's ``float[] fparams, int[] iparams``), one entry per scalar the
# kernels read, in the order of the packed lists: the C++ twin is ``enum FloatParam`` / ``enum IntParam`` in
# csrc/fdpo_op.h (tests/test_ops.py compares them). ``FDPOConfig.op_params`` fills them; ids as in ``ids``.
# logratio_clip <= 0: off; ipo_margin: 1 / (2 ipo_tau) of "ipo"; dmpo_log_q, dmpo_log_1mq: log q and log(1 - q) of
# loss_type "dmpo", q = 1 - dmpo_alpha (0 for other loss types); mapo_snr, mapo_timesteps: s and T of loss_type
# "mapo" (0 for other loss types); interleaved, strict_ties (implicit_acc counts a tie z == 0 as 0 instead of
# 1/2): 0/1.
# cross_term (0/1): the forward also reduces X = sum over pairs and elements of (pred_w - t_w)(pred_l - t_l) into
# summary[3] (unmasked; set for sdpo_mu, whose safeguard needs g_l . g_w; 0: summary[3] = 0 and the kernels'
# default variants, which do not accumulate it).
OP_FLOATS = (
    "beta",
    "alpha",
    "gamma",
    "label_smoothing",
    "logratio_clip",
    "ipo_margin",
    "dmpo_log_q",
    "dmpo_log_1mq",
    "mapo_snr",
    "mapo_timesteps",
)
OP_INTS = ("divergence", "err_reduction", "reduction", "loss_type", "interleaved", "strict_ties", "cross_term")


def options_doc(indent: int = 8) -> str:
    """The ``Args`` lines of the options, for the docstrings of the three entry points."""
    lines = []
    for name, f in OPTIONS.items():
        lines.append(textwrap.fill(f"{name}: {f.metadata['doc']}", 112, subsequent_indent="    "))
    return textwrap.indent("\n".join(lines), " " * indent)


def option_parameters() -> list[inspect.Parameter]:
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for name, f in OPTIONS.items()
    ]


def with_options(obj):
    """Give ``fn(..., **options)`` (or a class whose ``__init__`` is so) its real signature, the options as
    keyword-only parameters before ``return_stats`` and ``backend``, and its docstring's ``{options}`` line the
    options' docs."""
    fn = obj.__init__ if isinstance(obj, type) else obj
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    split = next((i for i, p in enumerate(params) if p.name in ("return_stats", "backend")), len(params))
    fn.__signature__ = sig.replace(parameters=params[:split] + option_parameters() + params[split:])
    obj.__doc__ = obj.__doc__.replace("{options}\n", options_doc().lstrip(" ") + "\n")
    return obj
