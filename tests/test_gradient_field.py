"""gradient_weights: the kernels' per-pair head read as a gradient field, checked against autograd of the reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss
from fdiv_kernels.divergences import get_divergence, psi_slope
from fdiv_kernels.gradient_field import (
    DEFAULT_DIVERGENCES,
    TABLE_POINTS,
    gradient_weights,
    main,
    mapo_gradient_weights,
    plot_gradient_field,
    weights_table,
)

REPO = Path(__file__).resolve().parents[1]

# (divergence, alpha)
DIVERGENCE_CASES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js", 0.5),
    ("alpha", 0.5),
    ("alpha", 0.2),
    ("alpha", 0.9),
    ("hellinger", 0.5),
]
# (gamma, label_smoothing, logratio_clip)
HEAD_OPTIONS = [(1.0, 0.0, None), (1.7, 0.1, None), (0.6, 0.0, 3.0)]


def _grid(lo: float = -6.0, hi: float = 6.0, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    d_l, d_w = torch.meshgrid(axis, axis, indexing="ij")
    return d_w.flatten(), d_l.flatten()


def _reference_weights(d_w, d_l, divergence, alpha, gamma, label_smoothing, logratio_clip):
    """-dloss_p/dd_w and +dloss_p/dd_l by autograd of fdpo_loss_reference, from inputs whose d is known.

    One element per sample, target 0, beta = 2 (d = e_ref - e): model x and reference r with
    x^2 = max(-d, 0) + 1 and r^2 = max(d, 0) + 1 give d = r^2 - x^2 exactly enough in float64, and
    dd/dx = -2x, so dloss/dd = grad_x / (-2x). Reduction "sum" makes each pair's loss its own term.
    """
    d = torch.cat([d_w, d_l]).to(torch.float64)
    x = (torch.clamp(-d, min=0) + 1).sqrt().reshape(-1, 1).requires_grad_(True)
    r = (torch.clamp(d, min=0) + 1).sqrt().reshape(-1, 1)
    target = torch.zeros_like(r)
    loss = fdpo_loss_reference(
        x,
        r,
        target,
        beta=2.0,
        divergence=divergence,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        logratio_clip=logratio_clip,
        reduction="sum",
    )
    (grad,) = torch.autograd.grad(loss, x)
    dloss_dd = grad.flatten() / (-2 * x.detach().flatten())
    b = d_w.numel()
    return -dloss_dd[:b], dloss_dd[b:]


@pytest.mark.parametrize("divergence,alpha", DIVERGENCE_CASES)
@pytest.mark.parametrize("gamma,label_smoothing,logratio_clip", HEAD_OPTIONS)
def test_matches_autograd_of_reference(divergence, alpha, gamma, label_smoothing, logratio_clip):
    d_w, d_l = _grid()
    push_w, push_l = gradient_weights(
        d_w,
        d_l,
        divergence,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        logratio_clip=logratio_clip,
    )
    assert push_w.dtype == torch.float64 and push_w.shape == d_w.shape
    # Exact ties d_w == d_l included: the reference differentiates psi(d_w) - psi(d_l) through psi' itself.
    assert (d_w == d_l).any()
    ref_w, ref_l = _reference_weights(d_w, d_l, divergence, alpha, gamma, label_smoothing, logratio_clip)
    torch.testing.assert_close(push_w, ref_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(push_l, ref_l, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCE_CASES)
@pytest.mark.parametrize("gamma,label_smoothing", [(1.0, 0.0), (1.7, 0.1)])
def test_ties(divergence, alpha, gamma, label_smoothing):
    """On the diagonal z = 0, so dloss/dz = -(1 - 2 eps)/2 and push = gamma * (1/2 - eps) * psi'(d)."""
    d = torch.linspace(-6, 6, 13, dtype=torch.float64)
    push_w, push_l = gradient_weights(d, d, divergence, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    expected = gamma * (0.5 - label_smoothing) * psi_slope(get_divergence(divergence, alpha), d)
    torch.testing.assert_close(push_w, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(push_l, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence,alpha", DIVERGENCE_CASES)
def test_float32_follows_float64(divergence, alpha):
    d_w, d_l = _grid()
    w32, l32 = gradient_weights(d_w.float(), d_l.float(), divergence, alpha=alpha)
    w64, l64 = gradient_weights(d_w, d_l, divergence, alpha=alpha)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w64, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(l32.double(), l64, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("divergence", DEFAULT_DIVERGENCES)
def test_weights_nonnegative_without_label_smoothing(divergence):
    d_w, d_l = _grid(-20, 20, 41)
    push_w, push_l = gradient_weights(d_w, d_l, divergence)
    assert (push_w >= 0).all() and (push_l >= 0).all()


def test_label_smoothing_turns_the_step_around_past_the_conservative_margin():
    eps = 0.1
    margin = math.log((1 - eps) / eps)  # z above this: the smoothed loss pulls the pair back together
    push_w, push_l = gradient_weights([margin - 0.5, margin + 0.5], 0.0, label_smoothing=eps)
    assert push_w[0] > 0 and push_l[0] > 0
    assert push_w[1] < 0 and push_l[1] < 0


def test_known_values():
    # reverse KL: both weights are sigmoid(-(d_w - d_l)).
    pw, pl = gradient_weights([0.0, 2.0, -2.0], [0.0, -2.0, 2.0], "reverse_kl")
    expected = torch.sigmoid(-torch.tensor([0.0, 4.0, -4.0]))
    torch.testing.assert_close(pw, expected)
    torch.testing.assert_close(pl, expected)
    # forward KL at (-2, 2): psi'(d) = exp(-d), z = -exp(2) + exp(-2).
    pw, pl = gradient_weights(torch.tensor(-2.0, dtype=torch.float64), 2.0, "forward_kl")
    s = torch.sigmoid(torch.tensor(math.exp(2) - math.exp(-2), dtype=torch.float64))
    torch.testing.assert_close(pw, s * math.exp(2))
    torch.testing.assert_close(pl, s * math.exp(-2))
    # JS at (0, 0): sigmoid(0) * sigmoid(0).
    pw, pl = gradient_weights(0.0, 0.0, "js")
    assert pw.item() == pytest.approx(0.25) and pl.item() == pytest.approx(0.25)


def test_hellinger_is_alpha_half_at_half_gamma():
    # psi_hellinger(d) = 1 - exp(-d/2) = psi_alpha0.5(d) / 2, as docs/gradient_field.md says.
    d_w, d_l = _grid()
    hw, hl = gradient_weights(d_w, d_l, "hellinger")
    aw, al = gradient_weights(d_w, d_l, "alpha", alpha=0.5, gamma=0.5)
    torch.testing.assert_close(hw, aw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hl, al, rtol=1e-12, atol=1e-15)


def test_broadcasting_and_python_inputs():
    pw, pl = gradient_weights(torch.zeros(3, 1), torch.linspace(-1, 1, 4), "js")
    assert pw.shape == pl.shape == (3, 4)
    assert pw.dtype == torch.float32
    pw, pl = gradient_weights(1, [0, 1], "hellinger")  # ints become floats
    assert pw.shape == (2,) and pw.dtype.is_floating_point
    pw, pl = gradient_weights(torch.empty(0), torch.empty(0))
    assert pw.shape == (0,)


EXTREMES = [-1e4, -1e3, -100.0, -60.0, -1.0, 0.0, 1.0, 60.0, 100.0, 1e3, 1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence,alpha", DIVERGENCE_CASES)
def test_extreme_log_ratios_give_no_nan(divergence, alpha, dtype):
    axis = torch.tensor(EXTREMES, dtype=dtype)
    d_l, d_w = torch.meshgrid(axis, axis, indexing="ij")
    for eps in (0.0, 0.2):
        pw, pl = gradient_weights(d_w, d_l, divergence, alpha=alpha, label_smoothing=eps)
        assert not pw.isnan().any() and not pl.isnan().any()
        if divergence in ("reverse_kl", "js"):
            assert pw.isfinite().all() and pl.isfinite().all()
        # Overflow (documented): a weight may be +inf, never -inf and never NaN, when eps = 0.
        if eps == 0:
            assert (pw >= 0).all() and (pl >= 0).all()
        # With the soft clamp every weight is finite, and the clip's slope keeps moderate ones non-zero.
        cw, cl = gradient_weights(d_w, d_l, divergence, alpha=alpha, label_smoothing=eps, logratio_clip=20.0)
        assert cw.isfinite().all() and cl.isfinite().all()
    cw, cl = gradient_weights(torch.tensor([-60.0], dtype=dtype), 60.0, divergence, alpha=alpha, logratio_clip=20.0)
    assert cw.item() > 0 and cl.item() > 0


def test_overflow_is_inf_where_the_math_overflows():
    # forward KL, winner far below the reference: the true weight exp(1e4) is beyond float64.
    pw, pl = gradient_weights(torch.tensor([-1e4], dtype=torch.float64), 0.0, "forward_kl")
    assert pw.item() == math.inf and pl.item() == pytest.approx(1.0)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_unknown_divergence():
    with pytest.raises(ValueError, match=r"unknown divergence='kl_forward'; expected one of"):
        gradient_weights(0.0, 0.0, "kl_forward")


def test_rejected_divergence_says_why():
    with pytest.raises(ValueError, match=r"violates the f-DPO condition: Pearson chi-squared"):
        gradient_weights(0.0, 0.0, "chi2")


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"alpha=.* is outside \(0, 1\)"):
        gradient_weights(0.0, 0.0, "alpha", alpha=alpha)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_ratios(bad):
    with pytest.raises(ValueError, match=r"d_w contains non-finite values .*defined for finite log-ratios"):
        gradient_weights(torch.tensor([0.0, bad]), 0.0)
    with pytest.raises(ValueError, match=r"d_l contains non-finite values"):
        gradient_weights(0.0, [bad])


def test_bad_scalars():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        gradient_weights(0.0, 0.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"gamma must be > 0"):
        gradient_weights(0.0, 0.0, gamma=0.0)
    with pytest.raises(ValueError, match=r"logratio_clip must be > 0"):
        gradient_weights(0.0, 0.0, logratio_clip=-1.0)
    with pytest.raises(TypeError, match=r"d_w must be real numbers"):
        gradient_weights(torch.tensor([True]), 0.0)


def test_plot_bad_input(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"extent must be a finite number > 0"):
        plot_gradient_field(out, extent=math.nan)
    with pytest.raises(ValueError, match=r"extent must be a finite number > 0"):
        plot_gradient_field(out, extent=0.0)
    with pytest.raises(ValueError, match=r"unknown divergence='nope'"):
        plot_gradient_field(out, divergences=["js", "nope"])
    with pytest.raises(ValueError, match=r"alpha=1.0 is outside \(0, 1\)"):
        plot_gradient_field(out, alpha=1.0)
    assert not out.exists()


# ---- plot, table, command line ------------------------------------------------------------------------------


def test_plot_and_command_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "field.png"
    assert main(["--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 300_000
    printed = capsys.readouterr().out
    for name in ("reverse_kl", "forward_kl", "js", "alpha=0.5", "hellinger"):
        assert name in printed
    for a, b in TABLE_POINTS:
        assert f"({a:g}, {b:g})" in printed
    assert f"wrote {out}" in printed


def test_command_line_rejects_bad_alpha(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "x.png"), "--alpha", "2"])
    assert info.value.code == 2
    assert "is outside (0, 1)" in capsys.readouterr().err


def test_table_numbers_match_gradient_weights():
    table = weights_table([(4.0, 0.0)], ["js"])
    pw, pl = gradient_weights(torch.tensor([4.0], dtype=torch.float64), 0.0, "js")
    assert f"{pw.item():.3g} / {pl.item():.3g}" in table


def test_committed_figure_is_small():
    png = REPO / "docs" / "img" / "gradient_field.png"
    if not png.exists():
        pytest.skip("docs/img/gradient_field.png not generated yet (python -m fdiv_kernels.gradient_field)")
    assert png.stat().st_size < 300_000


# ---- MaPO over the errors, and the SDPO loser scale ---------------------------------------------------------------


def _mapo_authors_weights(e_w, e_l, beta, snr, timesteps):
    """push_w = dloss/de_w, push_l = -dloss/de_l by autograd of MaPO as mapo-t2i/mapo@374b3d3:utils.py:286-301
    writes it (x / (exp(x) - 1)), in float64 where the errors are not tiny."""
    e_w = e_w.clone().requires_grad_(True)
    e_l = e_l.clone().requires_grad_(True)
    log_odds = (snr * e_w) / (torch.exp(snr * e_w) - 1) - (snr * e_l) / (torch.exp(snr * e_l) - 1)
    loss = (e_w - beta * torch.nn.functional.logsigmoid(log_odds * timesteps)).sum()
    g_w, g_l = torch.autograd.grad(loss, (e_w, e_l))
    return g_w, -g_l


@pytest.mark.parametrize("beta,snr,timesteps", [(0.1, 0.5, 1000.0), (1.0, 2.0, 50.0)])
def test_mapo_matches_the_authors_formula(beta, snr, timesteps):
    e_w, e_l = _grid(0.01, 0.12, 9)
    push_w, push_l = mapo_gradient_weights(e_w, e_l, beta=beta, mapo_snr=snr, mapo_timesteps=timesteps)
    ref_w, ref_l = _mapo_authors_weights(e_w, e_l, beta, snr, timesteps)
    torch.testing.assert_close(push_w, ref_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(push_l, ref_l, rtol=1e-9, atol=1e-12)


def test_mapo_matches_autograd_of_the_fused_loss():
    """One element per sample, target 0: e = x^2, so dloss/de = grad_x / (2 x)."""
    e_w, e_l = _grid(0.005, 0.1, 7)
    x = torch.cat([e_w, e_l]).sqrt().reshape(-1, 1).requires_grad_(True)
    loss = fused_fdpo_loss(x, None, torch.zeros_like(x), loss_type="mapo", beta=0.1, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    dloss_de = grad.flatten() / (2 * x.detach().flatten())
    push_w, push_l = mapo_gradient_weights(e_w, e_l)
    b = e_w.numel()
    torch.testing.assert_close(push_w, dloss_de[:b], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(push_l, -dloss_de[b:], rtol=1e-6, atol=1e-9)


def test_mapo_weights_signs_and_zero_errors():
    e_w, e_l = _grid(0.0, 0.2, 11)
    push_w, push_l = mapo_gradient_weights(e_w, e_l)
    assert bool(torch.isfinite(push_w).all()) and bool(torch.isfinite(push_l).all())
    assert bool((push_w >= 1.0).all())  # the winner's own error term pulls at weight 1 everywhere
    assert bool((push_l >= 0.0).all())
    # On the diagonal the sigmoid sits at 1/2: push_l = beta T s |phi'(s e)| / 2, phi'(0) = -1/2.
    pw, pl = mapo_gradient_weights(0.0, 0.0)
    assert pl.item() == pytest.approx(0.1 * 1000 * 0.5 * 0.5 / 2)
    assert pw.item() == pytest.approx(1.0 + 0.1 * 1000 * 0.5 * 0.5 / 2)
    assert pw.dtype == torch.float32


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_mapo_rejects_bad_errors(bad):
    with pytest.raises(ValueError, match="e_l must be finite per-sample errors >= 0"):
        mapo_gradient_weights(0.1, bad)


def test_sdpo_lambda_scales_the_loser_only():
    d_w, d_l = _grid()
    push_w, push_l = gradient_weights(d_w, d_l, "js")
    safe_w, safe_l = gradient_weights(d_w, d_l, "js", sdpo_lambda=0.25)
    torch.testing.assert_close(safe_w, push_w, rtol=0, atol=0)
    torch.testing.assert_close(safe_l, 0.25 * push_l)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sdpo_lambda must be in"):
            gradient_weights(d_w, d_l, sdpo_lambda=bad)


def test_plot_with_the_mapo_panel(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "mapo.png"
    assert main(["--out", str(out), "--divergences", "reverse_kl", "--mapo"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="mapo_extent"):
        plot_gradient_field(tmp_path / "bad.png", mapo=True, mapo_extent=0.0)
