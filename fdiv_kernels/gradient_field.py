"""Gradient-field analysis: how hard one f-DPO step pushes a winner up and a loser down.

For a pair with log-ratios ``d_w``, ``d_l`` (``d = beta/2 * w * (e_ref - e)``, positive when the policy
denoises a sample better than the reference), the per-pair loss ``loss_p(d_w, d_l)`` has

    push_w = -d loss_p / d d_w      how hard a gradient step raises the winner's log-ratio
    push_l = +d loss_p / d d_l      how hard it lowers the loser's

Both are >= 0 for every divergence when ``label_smoothing == 0`` (with label smoothing eps the step turns
around once the logit z exceeds log((1 - eps) / eps), as conservative DPO intends, and the weights go
negative). They are computed by the kernels' own per-pair head (``backends.torch_backend.pair_head``, the
Python twin of ``fdpo_pair_head`` in ``csrc/fdpo_math.h``), not by a separate derivation: the head's
backward coefficient is ``coef = dloss/de * 2 * inv`` and ``dd/de = -beta/2 * w``, so with beta = 2,
w = 1, inv = 1 and reduction "none", ``dloss_p/dd = -coef / 2``.

``d_w``/``d_l`` are the log-ratios *before* ``logratio_clip`` (what the errors give); with a clip the
weights include the clip's slope sech^2(d/c).

Diffusion-SDPO's winner-preserving safeguard (``sdpo_mu``) multiplies the loser's gradient by
``lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w), 0, 1)``, a number per batch computed from the residual vectors
(heads.sdpo_lambda), not from ``(d_w, d_l)``: ``gradient_weights(..., sdpo_lambda=lam)`` scales ``push_l`` by a
given lambda, the field the safeguarded step follows for that batch.

MaPO (``loss_type="mapo"``) has no reference, hence no log-ratio: its per-pair loss
``e_w - beta log sigmoid(T (phi(s e_w) - phi(s e_l)))`` is a function of the winner's and the loser's errors
themselves, so :func:`mapo_gradient_weights` takes the axes ``(e_w, e_l)``, the per-sample MSEs (>= 0), and returns

    push_w = +d loss_p / d e_w      how hard a step lowers the winner's error
    push_l = -d loss_p / d e_l      how hard it raises the loser's

the same sense as the f-DPO pushes (lowering an error raises its log-ratio ``d = e_ref - e``), so the update
direction in the error plane is ``(-push_w, +push_l)``. push_w >= 1 (MaPO's winner term ``e_w`` pulls at weight 1
everywhere) and push_l >= 0. Since ``z ~ -T s (e_w - e_l) / 2``, the sigmoid turns in a band of
``|e_w - e_l| ~ 4 / (T s)`` about the diagonal (0.016 at T = 1000, s = 0.5): the panel spans small errors.

Command line::

    python -m fdiv_kernels.gradient_field --out docs/img/gradient_field.png
    python -m fdiv_kernels.gradient_field --mapo --out gradient_field_mapo.png   # adds the MaPO panel
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence

import torch

from ._validation import MAPO_DEFAULTS, _finite_float, make_config
from .backends.common import KernelParams
from .backends.torch_backend import pair_head
from .divergences import get_divergence, psi_slope

__all__ = [
    "gradient_weights",
    "mapo_gradient_weights",
    "plot_gradient_field",
    "weights_table",
    "DEFAULT_DIVERGENCES",
    "TABLE_POINTS",
]

DEFAULT_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js", "alpha", "hellinger")
TABLE_POINTS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (2.0, -2.0), (-2.0, 2.0), (4.0, 0.0), (0.0, -4.0))


def _as_float_tensor(name: str, x) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be real numbers (a float, a sequence or a tensor); got {x!r} ({err})") from None
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be real numbers (a float, a sequence or a tensor); got dtype {t.dtype}")
    if not t.dtype.is_floating_point:
        t = t.to(torch.get_default_dtype())
    return t


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise ValueError(
            f"{name} contains non-finite values (e.g. {bad}); the gradient field is defined for finite "
            "log-ratios only (use logratio_clip to study very large ones)"
        )


def gradient_weights(
    d_w,
    d_l,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    logratio_clip: float | None = None,
    sdpo_lambda: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair gradient weights ``(push_w, push_l)`` of the f-DPO loss at log-ratios ``(d_w, d_l)``.

    Args:
        d_w, d_l: winner / loser log-ratios (floats, sequences or tensors; broadcast together). Computed in
            float64 if either is float64, else in float32 (the kernels' arithmetic for fp32/fp16/bf16).
        divergence, alpha, gamma, label_smoothing, logratio_clip: as in :func:`fdiv_kernels.fused_fdpo_loss`.
        sdpo_lambda: Diffusion-SDPO's loser scale lambda in [0, 1] for the batch (``stats.extra["sdpo_lambda"]``
            of a ``sdpo_mu`` call); ``push_l`` is multiplied by it. None: no safeguard.

    Returns:
        ``push_w = -dloss_p/dd_w`` and ``push_l = +dloss_p/dd_l``, each of the broadcast shape. Where
        forward_kl / alpha / hellinger overflow (k*d < -88.7 in float32, about -709 in float64) a weight is
        +inf, never NaN (docs/architecture.md, "Overflow").
    """
    d_w = _as_float_tensor("d_w", d_w)
    d_l = _as_float_tensor("d_l", d_l)
    _check_finite("d_w", d_w)
    _check_finite("d_l", d_l)
    # The loss's own validation and packing, with its messages. Halves layout of B = numel pairs; beta = 2 and no
    # pair weight make d = beta/2 * w * err_gap = err_gap; "sum" errors make inv = 1; reduction "none": loss_p per
    # pair, no 1/B.
    config = make_config(
        beta=2.0,
        divergence=divergence,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        logratio_clip=logratio_clip,
        err_reduction="sum",
        reduction="none",
    )
    lam = _finite_float("sdpo_lambda", sdpo_lambda, allow_none=True)
    if lam is not None and not (0.0 <= lam <= 1.0):
        raise ValueError(f"sdpo_lambda must be in [0, 1] (Diffusion-SDPO clamps its loser scale there); got {lam}")

    dtype = torch.float64 if torch.float64 in (d_w.dtype, d_l.dtype) else torch.float32
    d_w, d_l = torch.broadcast_tensors(d_w.to(dtype), d_l.to(dtype))
    shape = d_w.shape
    if d_w.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=d_w.device), torch.empty(shape, dtype=dtype, device=d_w.device)

    # Halves layout of B = numel pairs: rows 0..B-1 winners, B..2B-1 losers. With beta = 2 and no pair
    # weight, d = beta/2 * w * err_gap = err_gap; inv = 1 (per-sample error as a plain sum).
    err_gap = torch.cat([d_w.reshape(-1), d_l.reshape(-1)])
    inv = torch.ones_like(err_gap)
    params = KernelParams.unpack(*config.op_scalars())
    _, _, _, _, coef = pair_head(params, err_gap, inv, None)
    # coef_i = dloss/de_i * 2 * inv_i (red = 1) and dd_i/de_i = -beta/2 * w = -1, so dloss/dd_i = -coef_i / 2.
    num_pairs = d_w.numel()
    push_w = coef[:num_pairs] / 2  # -dloss/dd_w
    push_l = -coef[num_pairs:] / 2  # +dloss/dd_l
    if lam is not None:  # heads._WinnerPreserving: the losers' coefficients times lambda
        push_l = push_l * lam
    return push_w.reshape(shape), push_l.reshape(shape)


def mapo_gradient_weights(
    e_w,
    e_l,
    beta: float = 0.1,
    mapo_snr: float = MAPO_DEFAULTS["mapo_snr"],
    mapo_timesteps: float = MAPO_DEFAULTS["mapo_timesteps"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair gradient weights of MaPO over the winner / loser errors: ``push_w = dloss_p/de_w``,
    ``push_l = -dloss_p/de_l`` (module docstring: MaPO has no log-ratio, so its axes are the errors).

    Args:
        e_w, e_l: winner / loser per-sample errors (MSEs, >= 0; broadcast together). float64 if either is, else
            float32.
        beta, mapo_snr, mapo_timesteps: as in ``fused_fdpo_loss(..., loss_type="mapo")``.

    The head is the loss's own (``backends.torch_backend.pair_head``, the twin of csrc/fdpo_math.h's
    mapo_pair_head, with the stable phi'), reduction "none": its backward coefficient with inv = 1 is 2 dloss_p/de.
    """
    e_w = _as_float_tensor("e_w", e_w)
    e_l = _as_float_tensor("e_l", e_l)
    for name, t in (("e_w", e_w), ("e_l", e_l)):
        if t.numel() and not bool((torch.isfinite(t) & (t >= 0)).all()):
            raise ValueError(f"{name} must be finite per-sample errors >= 0 (MaPO's axes are the MSEs)")
    config = make_config(  # the loss's own checks of beta, s and T, with its messages
        loss_type="mapo",
        beta=beta,
        mapo_snr=mapo_snr,
        mapo_timesteps=mapo_timesteps,
        err_reduction="sum",
        reduction="none",
    )
    dtype = torch.float64 if torch.float64 in (e_w.dtype, e_l.dtype) else torch.float32
    e_w, e_l = torch.broadcast_tensors(e_w.to(dtype), e_l.to(dtype))
    shape = e_w.shape
    e = torch.cat([e_w.reshape(-1), e_l.reshape(-1)])
    params = KernelParams.unpack(*config.op_scalars())
    # The kernels read e_ref - e = -e (MaPO's cached reference errors are 0); coef_i = dloss/de_i * 2 * inv_i.
    _, _, _, _, coef = pair_head(params, -e, torch.ones_like(e), None)
    num_pairs = e_w.numel()
    return (coef[:num_pairs] / 2).reshape(shape), (-coef[num_pairs:] / 2).reshape(shape)


def weights_table(
    points: Iterable[tuple[float, float]] = TABLE_POINTS,
    divergences: Sequence[str] = DEFAULT_DIVERGENCES,
    alpha: float = 0.5,
    **kwargs,
) -> str:
    """A plain-text table of ``(push_w, push_l)`` at a few ``(d_w, d_l)`` points, one row per divergence."""
    points = [(float(a), float(b)) for a, b in points]
    d_w = torch.tensor([p[0] for p in points], dtype=torch.float64)
    d_l = torch.tensor([p[1] for p in points], dtype=torch.float64)
    names = [_label(name, alpha) for name in divergences]
    rows = []
    for name in divergences:
        pw, pl = gradient_weights(d_w, d_l, name, alpha=alpha, **kwargs)
        rows.append([f"{w:.3g} / {l:.3g}" for w, l in zip(pw.tolist(), pl.tolist())])
    heads = [f"({a:g}, {b:g})" for a, b in points]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(heads)]
    first = max(len("d_w, d_l ->"), *(len(n) for n in names))
    head = f"{'d_w, d_l ->':<{first}} | " + " | ".join(h.center(w) for h, w in zip(heads, widths))
    lines = [
        "push_w / push_l: how hard one step raises the winner's / lowers the loser's log-ratio",
        head,
        "-" * len(head),
    ]
    for label, cells in zip(names, rows):
        lines.append(f"{label:<{first}} | " + " | ".join(c.center(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _label(name: str, alpha: float) -> str:
    return f"alpha={alpha:g}" if get_divergence(name, alpha).name == "alpha" else get_divergence(name, alpha).name


def plot_gradient_field(
    path,
    divergences: Sequence[str] = DEFAULT_DIVERGENCES,
    alpha: float = 0.5,
    extent: float = 4.0,
    resolution: int = 81,
    dpi: int = 90,
    mapo: bool = False,
    mapo_extent: float = 0.1,
):
    """Draw the update field of each divergence over ``(d_w, d_l)`` in ``[-extent, extent]^2`` and psi'(d).

    One panel per divergence: streamlines of the update direction ``(+push_w, -push_l)`` (the way one step
    moves the pair's log-ratios), coloured and backed by its magnitude on a shared log scale; the diagonal
    ``d_w = d_l`` (logit 0) is dashed. A last panel plots psi'(d). ``mapo``: one more panel, MaPO's field over
    the errors ``(e_w, e_l)`` in ``[0, mapo_extent]^2`` with the default beta, s and T (direction
    ``(-push_w, +push_l)``, its own log colour scale: its weights are not on the f-DPO panels' scale). Saves a
    PNG at ``path`` and returns it.
    """
    extent = float(extent)
    if not math.isfinite(extent) or extent <= 0:
        raise ValueError(f"extent must be a finite number > 0 (the grid is [-extent, extent]^2); got {extent}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 5:
        raise ValueError(f"resolution must be an int >= 5 (grid points per axis); got {resolution!r}")
    if isinstance(divergences, str):
        divergences = (divergences,)
    divergences = tuple(divergences)
    if not divergences:
        raise ValueError("divergences is empty; pass at least one of " + ", ".join(DEFAULT_DIVERGENCES))
    for name in divergences:
        get_divergence(name, alpha)
    mapo_extent = float(mapo_extent)
    if mapo and not (math.isfinite(mapo_extent) and mapo_extent > 0):
        raise ValueError(f"mapo_extent must be a finite number > 0 (errors over [0, mapo_extent]); got {mapo_extent}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    grid_l, grid_w = torch.meshgrid(axis, axis, indexing="ij")  # rows: d_l (y), columns: d_w (x)
    fields = {}
    for name in divergences:
        push_w, push_l = gradient_weights(grid_w, grid_l, name, alpha=alpha)
        fields[name] = (push_w.numpy(), push_l.numpy())
    mags = {name: (pw**2 + pl**2) ** 0.5 for name, (pw, pl) in fields.items()}
    positive = [m[m > 0] for m in mags.values() if (m > 0).any()]
    lo = max(min(float(m.min()) for m in positive), 1e-4) if positive else 1e-4
    hi = max(max(float(m.max()) for m in positive), lo * 10) if positive else 1.0
    norm = LogNorm(vmin=lo, vmax=hi)
    cmap = plt.get_cmap("viridis", 24)  # discrete levels: readable steps, and a small palette PNG

    panels = len(divergences) + 1 + int(mapo)
    cols = 3 if panels > 4 else panels
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.3 * cols + 1.0, 4.0 * rows + 0.6), squeeze=False, layout="constrained"
    )
    flat = axes.ravel()
    x = axis.numpy()
    mesh = None
    for ax, name in zip(flat, divergences):
        pw, pl = fields[name]
        mag = mags[name]
        mesh = ax.pcolormesh(x, x, mag, norm=norm, cmap=cmap, shading="auto", rasterized=True)
        ax.streamplot(x, x, pw, -pl, color="white", density=0.9, linewidth=0.7, arrowsize=0.8)
        ax.plot([-extent, extent], [-extent, extent], "--", color="0.85", linewidth=0.8)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_title(_label(name, alpha))
        ax.set_xlabel("d_w (winner log-ratio)")
        ax.set_ylabel("d_l (loser log-ratio)")
    ax = flat[len(divergences)]
    d = torch.linspace(-extent, extent, 401, dtype=torch.float64)
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap; stubs say Colormap
    for i, name in enumerate(divergences):
        ax.plot(
            d.numpy(),
            psi_slope(get_divergence(name, alpha), d).numpy(),
            label=_label(name, alpha),
            color=colors[i % len(colors)],
            linewidth=1.6,
        )
    ax.set_yscale("log")
    ax.set_xlabel("d")
    ax.set_ylabel("psi'(d)")
    ax.set_title("slope of the implicit reward psi'(d)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if mapo:
        _mapo_panel(fig, flat[len(divergences) + 1], mapo_extent, resolution, cmap)
    for extra in flat[panels:]:
        extra.set_visible(False)
    if mesh is not None:
        fig.colorbar(
            mesh,
            ax=list(flat),
            shrink=0.7,
            extend="min",
            label=f"field panels: |(push_w, push_l)|, log scale (below {lo:.0e}: darkest)",
        )
    fig.suptitle("f-DPO update direction (+push_w, -push_l) over (d_w, d_l); dashed: logit 0", fontsize=12)
    _save_png(fig, path, dpi)
    plt.close(fig)
    return path


def _mapo_panel(fig, ax, extent: float, resolution: int, cmap) -> None:
    """MaPO's update field over the errors (e_w, e_l), with its own log colour bar."""
    from matplotlib.colors import LogNorm

    axis = torch.linspace(0.0, extent, resolution, dtype=torch.float64)
    grid_l, grid_w = torch.meshgrid(axis, axis, indexing="ij")  # rows: e_l (y), columns: e_w (x)
    push_w, push_l = mapo_gradient_weights(grid_w, grid_l)
    pw, pl = push_w.numpy(), push_l.numpy()
    mag = (pw**2 + pl**2) ** 0.5
    norm = LogNorm(vmin=float(mag.min()), vmax=max(float(mag.max()), float(mag.min()) * 10))
    x = axis.numpy()
    mesh = ax.pcolormesh(x, x, mag, norm=norm, cmap=cmap, shading="auto", rasterized=True)
    ax.streamplot(x, x, -pw, pl, color="white", density=0.9, linewidth=0.7, arrowsize=0.8)
    ax.plot([0, extent], [0, extent], "--", color="0.85", linewidth=0.8)
    ax.set_xlim(0, extent)
    ax.set_ylim(0, extent)
    ax.set_aspect("equal")
    ax.set_title("MaPO (no reference): over the errors")
    ax.set_xlabel("e_w (winner error)")
    ax.set_ylabel("e_l (loser error)")
    fig.colorbar(mesh, ax=ax, shrink=0.8, label="MaPO |(push_w, push_l)|")


def _save_png(fig, path, dpi: int) -> None:
    """Save as a 256-colour palette PNG (a third of the RGBA size; the figure has few distinct colours)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    try:
        from PIL import Image
    except ImportError:  # pillow is a matplotlib dependency; keep the plain PNG if it is somehow missing
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdiv_kernels.gradient_field",
        description="Plot the f-DPO gradient field per divergence and print the weights at a few points.",
    )
    parser.add_argument("--out", default="docs/img/gradient_field.png", help="PNG to write")
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of the alpha-divergence, in (0, 1)")
    parser.add_argument("--extent", type=float, default=4.0, help="plot (d_w, d_l) over [-extent, extent]^2")
    parser.add_argument("--divergences", nargs="+", default=list(DEFAULT_DIVERGENCES), help="divergences to draw")
    parser.add_argument("--mapo", action="store_true", help="add MaPO's panel, over the errors (e_w, e_l)")
    parser.add_argument("--mapo-extent", type=float, default=0.1, help="MaPO panel over [0, extent]^2 of errors")
    args = parser.parse_args(argv)
    try:
        out = plot_gradient_field(
            args.out,
            divergences=args.divergences,
            alpha=args.alpha,
            extent=args.extent,
            mapo=args.mapo,
            mapo_extent=args.mapo_extent,
        )
        print(weights_table(divergences=args.divergences, alpha=args.alpha))
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
