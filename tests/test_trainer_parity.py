"""Drop-in parity: one fused_fdpo_loss call reproduces existing trainers' loss, gradient and logged statistics.

The trainer formulas below are re-implemented from the loss lines of the diffusers Diffusion-DPO scripts and the
original Diffusion-DPO code (docs/dropin.md), and evaluated in float64 on the very values the fused loss sees:
fdiv_kernels accumulates e_ref - e directly (spec §2 (docs/spec.md)), so against the formulas evaluated in float32
agreement would be bounded by those formulas' own cancellation, not by fdiv_kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from harness import assert_grad_rows_close

from fdiv_kernels import fused_fdpo_loss
from fdiv_kernels.integrations import (
    TRAINER_CONVENTIONS,
    fdpo_loss_from_pairs,
    trainer_conventions,
    trainer_logs,
)
from fdiv_kernels.options import OPTIONS

F64 = torch.float64


def _cpu_backend_unavailable() -> str | None:
    try:
        from fdiv_kernels.backends import cpp
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"fdiv_kernels.backends.cpp failed to import: {err!r}"
    why = getattr(cpp, "why_unavailable", None)
    if why is None:
        return "fdiv_kernels.backends.cpp has no why_unavailable() yet: the C++ CPU kernel is not built"
    return why("cpu")


_CPU_WHY = _cpu_backend_unavailable()
BACKENDS = [
    "torch",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(_CPU_WHY is not None, reason=f"backend='cpu' unavailable: {_CPU_WHY}"),
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _all_backends():
    """torch, cpu and triton (Triton's interpreter on a CPU-only machine), each skipped with the reason."""
    from fdiv_kernels.backends import _why_unavailable

    device = torch.device("cpu")  # the tests' tensors live on the CPU
    for name in ("torch", "cpu", "triton"):
        why = _why_unavailable(name, device)
        yield pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=f"backend={name!r}: {why}"))


ALL_BACKENDS = list(_all_backends())


# ---- the trainers' loss lines, evaluated in float64 ----------------------------------------------------------


def _per_sample_mse(pred, target):
    losses = F.mse_loss(pred.to(F64), target.to(F64), reduction="none")
    return losses.mean(dim=list(range(1, len(losses.shape))))


def diffusers_sdxl_loss(model_pred, ref_pred, target, beta_dpo):
    """train_diffusion_dpo_sdxl.py (``.float()`` casts become float64 here)."""
    model_losses = _per_sample_mse(model_pred, target)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = _per_sample_mse(ref_pred, target)
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_loss.mean()
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    implicit_acc = (inside_term > 0).sum().to(F64) / inside_term.size(0)
    implicit_acc += 0.5 * (inside_term == 0).sum().to(F64) / inside_term.size(0)
    return dict(
        loss=loss,
        raw_model_loss=raw_model_loss,
        ref_loss=raw_ref_loss,
        implicit_acc=implicit_acc,
        logits=inside_term,
        model_err=model_losses,
        ref_err=ref_loss,
    )


def diffusers_sd15_loss(model_pred, ref_pred, target, beta_dpo):
    """train_diffusion_dpo.py, ``--loss_type sigmoid``."""
    model_losses = _per_sample_mse(model_pred, target)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = _per_sample_mse(ref_pred, target)
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_loss.mean()
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().to(F64) / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().to(F64) / logits.size(0)
    # fdiv_kernels' logit z is the argument of logsigmoid: beta_dpo * logits.
    return dict(
        loss=loss,
        raw_model_loss=raw_model_loss,
        ref_loss=raw_ref_loss,
        implicit_acc=implicit_acc,
        logits=beta_dpo * logits,
        model_err=model_losses,
        ref_err=ref_loss,
    )


def original_diffusion_dpo_loss(model_pred, ref_pred, target, beta_dpo):
    """The original Diffusion-DPO code: no float cast (float64 here), strict implicit_acc."""
    dims = list(range(1, model_pred.dim()))
    model_losses = (model_pred.to(F64) - target.to(F64)).pow(2).mean(dim=dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.to(F64) - target.to(F64)).pow(2).mean(dim=dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().to(F64) / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return dict(
        loss=loss,
        raw_model_loss=raw_model_loss,
        ref_loss=raw_ref_loss,
        implicit_acc=implicit_acc,
        logits=inside_term,
        model_err=model_losses,
        ref_err=ref_losses,
    )


def flow_sum_loss(model_pred, ref_pred, target, beta_dpo):
    """A flow-matching trainer in the SimpleTuner style: per-sample squared error summed, 0.5 * beta."""
    dims = list(range(1, model_pred.dim()))
    model_losses = (model_pred.to(F64) - target.to(F64)).pow(2).sum(dim=dims)
    ref_losses = (ref_pred.to(F64) - target.to(F64)).pow(2).sum(dim=dims)
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    inside_term = -0.5 * beta_dpo * ((model_w - model_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(inside_term).mean()
    implicit_acc = (inside_term > 0).to(F64).mean() + 0.5 * (inside_term == 0).to(F64).mean()
    return dict(
        loss=loss,
        raw_model_loss=model_losses.mean(),
        ref_loss=ref_losses.mean(),
        implicit_acc=implicit_acc,
        logits=inside_term,
        model_err=model_losses,
        ref_err=ref_losses,
    )


def inpo_loss(model_pred, ref_pred, target, beta_dpo):
    """JaydenLyh/InPO@a9cfc4de:train.py:1032-1052 (train_method "ddiminpo"): no float cast, 0.5 * beta_dpo,
    strict implicit_acc; its target is the inverted noise, one per sample."""
    model_losses = (model_pred.to(F64) - target.to(F64)).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    with torch.no_grad():
        ref_losses = (ref_pred.to(F64) - target.to(F64)).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    inside_term = -0.5 * beta_dpo * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    return dict(
        loss=-1 * F.logsigmoid(inside_term).mean(),
        raw_model_loss=raw_model_loss,
        ref_loss=ref_losses.mean(),
        implicit_acc=(inside_term > 0).sum().to(F64) / inside_term.size(0),
        logits=inside_term,
        model_err=model_losses,
        ref_err=ref_losses,
    )


def kohya_dpo_loss(model_pred, ref_pred, target, beta_dpo):
    """kohya sd-scripts PR #1427 (rockerBOO/sd-scripts@6e124dcc:train_network.py:903-951), --beta_dpo, no mask,
    loss_weights 1: conditional_loss(l2) = squared error, mean per sample, -0.5 * beta_dpo, ties count 1/2, then
    loss.mean() over the pairs (:1004)."""
    loss = F.mse_loss(model_pred.to(F64), target.to(F64), reduction="none")
    model_loss = loss.mean(dim=list(range(1, len(loss.shape))))
    model_loss_w, model_loss_l = model_loss.chunk(2)
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_pred.to(F64), target.to(F64), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    inside_term = -0.5 * beta_dpo * ((model_loss_w - model_loss_l) - (ref_losses_w - ref_losses_l))
    implicit_acc = (inside_term > 0).sum().to(F64) / inside_term.size(0)
    implicit_acc += 0.5 * (inside_term == 0).sum().to(F64) / inside_term.size(0)
    return dict(
        loss=(-1 * F.logsigmoid(inside_term)).mean(),
        raw_model_loss=0.5 * (model_loss_w.mean() + model_loss_l.mean()),
        ref_loss=ref_loss.mean(),
        implicit_acc=implicit_acc,
        logits=inside_term,
        model_err=model_loss,
        ref_err=ref_loss,
    )


TRAINERS = {
    # name: (formula, conventions key, beta as the trainer's flag holds it)
    "diffusers_sdxl": (diffusers_sdxl_loss, "diffusers_sdxl", 5000.0),
    "diffusers_sd15": (diffusers_sd15_loss, "diffusers_sd15", 2500.0),
    "original": (original_diffusion_dpo_loss, "diffusion_dpo", 5000.0),
    "inpo": (inpo_loss, "inpo", 2000.0),
    "kohya_dpo": (kohya_dpo_loss, "kohya_dpo", 5000.0),
    # Diffusion-NPO runs diffusers' SD1.5 lines on rows [dispreferred; preferred] (test_diffusion_npo_swap below).
    "diffusion_npo_sd15": (diffusers_sd15_loss, "diffusion_npo_sd15", 500.0),
    "diffusion_npo_sdxl": (diffusers_sdxl_loss, "diffusion_npo_sdxl", 2000.0),
}


# ---- inputs ---------------------------------------------------------------------------------------------------


def make_batch(dtype, num_pairs=6, shape=(4, 16, 16), delta=0.01, seed=2, tie_pair=True, distinct_targets=False):
    """Predictions near the reference (as in fine-tuning), shared epsilon target as the scripts build it, or
    (``distinct_targets``) a different target for every sample, as v-prediction and flow matching have.

    Pair 0 is a tie when ``tie_pair``: the policy equals the reference on both its samples, so the trainer's
    inside_term is exactly 0 there (the case where the implicit_acc tie rules differ).
    """
    g = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    model = torch.randn(rows, *shape, generator=g)
    ref = model + delta * torch.randn(rows, *shape, generator=g)
    noise = torch.randn(num_pairs, *shape, generator=g).repeat(2, *([1] * len(shape)))  # chunk(2)[0].repeat(2)
    if distinct_targets:
        noise = torch.randn(rows, *shape, generator=g)
    model, ref, noise = model.to(dtype), ref.to(dtype), noise.to(dtype)
    if tie_pair:
        ref[0] = model[0]
        ref[num_pairs] = model[num_pairs]
    return model, ref, noise


def _grad_of_formula(formula, model, ref, target, beta):
    leaf = model.detach().to(F64).requires_grad_(True)
    out = formula(leaf, ref, target, beta)
    (grad,) = torch.autograd.grad(out["loss"], leaf)
    return out, grad


def _fused(model, ref, target, backend, **kwargs):
    leaf = model.detach().clone().requires_grad_(True)
    loss, stats = fused_fdpo_loss(leaf, ref, target, return_stats=True, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, stats, grad


def _assert_grad_close(grad, expected, dtype):
    """Gradient in model_pred's dtype against the float64 formula: the dtype's rounding, each row against its own
    scale (a row with small gradients is held to its own size, not to the largest row's)."""
    assert_grad_rows_close(grad, expected, dtype)


def _assert_stats_match(loss, stats, expected, num_pairs):
    torch.testing.assert_close(loss.to(F64), expected["loss"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(stats.logits.to(F64), expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.model_err.to(F64), expected["model_err"], rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.ref_err.to(F64), expected["ref_err"], rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.raw_model_loss.to(F64), expected["raw_model_loss"], rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.raw_ref_loss.to(F64), expected["ref_loss"], rtol=2e-6, atol=0)
    # float32 vs float64 of the same fraction; one pair more or less would be off by 1/(2B) at least.
    assert stats.implicit_acc.item() == pytest.approx(expected["implicit_acc"].item(), abs=1e-6)
    logs = trainer_logs(loss, stats)
    assert set(logs) == {"loss", "raw_model_loss", "ref_loss", "implicit_acc"}
    for key in logs:
        assert logs[key].item() == pytest.approx(expected[key].item(), rel=2e-6, abs=1e-7), key


# ---- (a), (b), (c): the three epsilon-prediction trainers ------------------------------------------------------


def assert_each_target_half_counts(formula, model, ref, target, beta, backend, **kwargs):
    """Issue 16, degenerate targets: giving the winners the losers' targets (or the reverse) changes the trainer's
    loss, and the fused loss follows the formula, so a kernel reading one half for both would fail."""
    num_pairs = model.shape[0] // 2
    assert not torch.equal(target[:num_pairs], target[num_pairs:])
    base = formula(model, ref, target, beta)["loss"].item()
    for half in (slice(0, num_pairs), slice(num_pairs, None)):
        degenerate = target.clone()
        degenerate[half] = target.roll(num_pairs, 0)[half]  # each sample gets its partner's target
        moved = formula(model, ref, degenerate, beta)["loss"].item()
        assert abs(moved - base) > 1e-3 * abs(base), "this half of the target does not change the loss"
        fused = fused_fdpo_loss(model, ref, degenerate, beta=beta, backend=backend, **kwargs).item()
        assert fused == pytest.approx(moved, rel=2e-6, abs=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trainer", list(TRAINERS))
@pytest.mark.parametrize("targets", ["distinct2B", "repeated2B", "sharedB"])
def test_trainer_parity(trainer, dtype, backend, targets):
    """``repeated2B``/``sharedB``: the scripts' shared epsilon noise as [2B] rows or [B]; ``distinct2B``: a target
    per sample (v-prediction), where each half must be read."""
    formula, conventions, beta = TRAINERS[trainer]
    model, ref, noise = make_batch(dtype, distinct_targets=targets == "distinct2B")
    num_pairs = model.shape[0] // 2
    expected, expected_grad = _grad_of_formula(formula, model, ref, noise, beta)
    # Sanity of the setup: one exact tie, and logits of order 1 on both sides of 0.
    assert (expected["logits"] == 0).sum() == 1
    assert (expected["logits"] > 0).any() and (expected["logits"] < 0).any()
    assert expected["logits"].abs().max() < 20

    target = noise[:num_pairs] if targets == "sharedB" else noise  # the documented shared-noise form
    loss, stats, grad = _fused(model, ref, target, backend, beta=beta, **trainer_conventions(conventions))
    assert grad.dtype == dtype
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, dtype)
    if targets == "distinct2B":
        assert_each_target_half_counts(formula, model, ref, noise, beta, backend, **trainer_conventions(conventions))


def test_closer_to_float64_than_the_scripts_float32_formula():
    """spec §2 (docs/spec.md): the script's e_ref - e, a difference of two rounded fp32 means, cancels; the fused loss
    accumulates it directly. Near the reference (fine-tuning) its logits are orders of magnitude closer to the
    float64 truth than the script's own fp32 evaluation, which is why parity is checked against float64."""
    model, ref, noise = make_batch(torch.float32, delta=1e-3, tie_pair=False)
    truth = diffusers_sdxl_loss(model, ref, noise, 5000.0)["logits"]

    def script_fp32(pred, ref_pred, target, beta):  # the script as written: .float() casts
        m = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        r = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        (mw, ml), (rw, rl) = m.chunk(2), r.chunk(2)
        return -0.5 * beta * ((mw - ml) - (rw - rl))

    script_err = (script_fp32(model, ref, noise, 5000.0).to(F64) - truth).abs().max().item()
    stats = fused_fdpo_loss(model, ref, noise, beta=5000.0, return_stats=True, backend="torch")[1]
    fused_err = (stats.logits.to(F64) - truth).abs().max().item()
    assert fused_err * 10 < script_err


def test_tie_rules_differ_between_trainers():
    model, ref, noise = make_batch(torch.float32)
    half = _fused(model, ref, noise, "torch", **trainer_conventions("diffusers_sdxl"))[1].implicit_acc
    strict = _fused(model, ref, noise, "torch", **trainer_conventions("diffusion_dpo"))[1].implicit_acc
    assert half.item() - strict.item() == pytest.approx(0.5 / (model.shape[0] // 2))


def test_wrong_beta_convention_is_not_parity():
    """The SD1.5 script's beta_dpo has no 1/2: passing it with the default convention halves every logit."""
    model, ref, noise = make_batch(torch.float32)
    expected = diffusers_sd15_loss(model, ref, noise, 2500.0)
    right = fused_fdpo_loss(model, ref, noise, beta=2500.0, beta_convention="full", backend="torch")
    wrong = fused_fdpo_loss(model, ref, noise, beta=2500.0, backend="torch")
    assert right.item() == pytest.approx(expected["loss"].item(), rel=2e-6)
    assert abs(wrong.item() - expected["loss"].item()) > 1e-2
    same_as_half = fused_fdpo_loss(model, ref, noise, beta=5000.0, backend="torch")
    assert same_as_half.item() == pytest.approx(right.item(), rel=1e-6)


# ---- other conventions: summed errors (flow matching, 5-D), masked mean, interleaved rows ------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 4, 6, 6)], ids=["4d", "5d"])
def test_flow_matching_sum_parity(dtype, backend, shape):
    """target = noise - latents (differs between winner and loser: a [2B] target), errors summed."""
    g = torch.Generator().manual_seed(1)
    num_pairs = 4
    latents = torch.randn(2 * num_pairs, *shape, generator=g)
    noise = torch.randn(num_pairs, *shape, generator=g).repeat(2, *([1] * len(shape)))
    target = (noise - latents).to(dtype)
    model = (target.float() + 0.3 * torch.randn(target.shape, generator=g)).to(dtype)
    ref = (model.float() + 0.01 * torch.randn(target.shape, generator=g)).to(dtype)
    beta = 2.0
    expected, expected_grad = _grad_of_formula(flow_sum_loss, model, ref, target, beta)
    assert expected["logits"].abs().max() < 20 and (expected["logits"] != 0).all()
    loss, stats, grad = _fused(model, ref, target, backend, beta=beta, **trainer_conventions("simpletuner_flow"))
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_mask", [False, True], ids=["mask2B", "sharedB"])
def test_masked_mean_parity(backend, shared_mask):
    model, ref, noise = make_batch(torch.float32, tie_pair=False)
    num_pairs = model.shape[0] // 2
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(num_pairs if shared_mask else 2 * num_pairs, *model.shape[1:], generator=g) > 0.3).float()
    mask_rows = mask.repeat(2, 1, 1, 1) if shared_mask else mask
    dims = list(range(1, model.dim()))

    def masked_formula(pred, ref_pred, target, beta):
        m = mask_rows.to(F64)
        err = ((pred.to(F64) - target.to(F64)) ** 2 * m).sum(dims) / m.sum(dims)
        with torch.no_grad():
            ref_err = ((ref_pred.to(F64) - target.to(F64)) ** 2 * m).sum(dims) / m.sum(dims)
        (ew, el), (rw, rl) = err.chunk(2), ref_err.chunk(2)
        inside = -0.5 * beta * ((ew - el) - (rw - rl))
        return dict(
            loss=-F.logsigmoid(inside).mean(),
            raw_model_loss=err.mean(),
            ref_loss=ref_err.mean(),
            implicit_acc=(inside > 0).to(F64).mean() + 0.5 * (inside == 0).to(F64).mean(),
            logits=inside,
            model_err=err,
            ref_err=ref_err,
        )

    expected, expected_grad = _grad_of_formula(masked_formula, model, ref, noise, 5000.0)
    loss, stats, grad = _fused(model, ref, noise, backend, beta=5000.0, mask=mask)
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, torch.float32)


def flow_mean_all_loss(mask_rows):
    """A flow-matching trainer with norm_type="mean" and a mask: (err * mask).mean() over all elements."""

    def formula(model_pred, ref_pred, target, beta_dpo):
        dims = list(range(1, model_pred.dim()))
        m = mask_rows.to(F64)
        model_losses = ((model_pred.to(F64) - target.to(F64)).pow(2) * m).mean(dim=dims)
        with torch.no_grad():
            ref_losses = ((ref_pred.to(F64) - target.to(F64)).pow(2) * m).mean(dim=dims)
        (mw, ml), (rw, rl) = model_losses.chunk(2), ref_losses.chunk(2)
        inside_term = -0.5 * beta_dpo * ((mw - ml) - (rw - rl))
        return dict(
            loss=-F.logsigmoid(inside_term).mean(),
            raw_model_loss=model_losses.mean(),
            ref_loss=ref_losses.mean(),
            logits=inside_term,
            model_err=model_losses,
            ref_err=ref_losses,
            implicit_acc=(inside_term > 0).to(F64).mean() + 0.5 * (inside_term == 0).to(F64).mean(),
        )

    return formula


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_mask", [False, True], ids=["mask2B", "sharedB"])
def test_flow_matching_masked_mean_over_all_elements(dtype, backend, shared_mask):
    """trainer_conventions("simpletuner_flow_mean"): err_reduction="mean_all", the mask's zeros still counted in the
    denominator; distinct targets (noise - latents), a float32 mask beside 16-bit predictions."""
    g = torch.Generator().manual_seed(5)
    num_pairs, shape = 4, (4, 8, 8)
    latents = torch.randn(2 * num_pairs, *shape, generator=g)
    target = (torch.randn(2 * num_pairs, *shape, generator=g) - latents).to(dtype)
    model = (target.float() + 0.3 * torch.randn(target.shape, generator=g)).to(dtype)
    ref = (model.float() + 0.01 * torch.randn(target.shape, generator=g)).to(dtype)
    mask = (torch.rand(num_pairs if shared_mask else 2 * num_pairs, *shape, generator=g) > 0.4).float()
    mask_rows = mask.repeat(2, 1, 1, 1) if shared_mask else mask
    formula, beta = flow_mean_all_loss(mask_rows), 20000.0
    expected, expected_grad = _grad_of_formula(formula, model, ref, target, beta)
    assert 0.5 < expected["logits"].abs().max() < 20
    conventions = trainer_conventions("simpletuner_flow_mean")
    loss, stats, grad = _fused(model, ref, target, backend, beta=beta, mask=mask, **conventions)
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, dtype)
    assert_each_target_half_counts(formula, model, ref, target, beta, backend, mask=mask, **conventions)
    # Without a mask "mean_all" is the plain mean; with one it is not the masked mean.
    masked_mean = fused_fdpo_loss(model, ref, target, beta=beta, mask=mask, backend=backend)
    assert abs(masked_mean.item() - loss.item()) > 1e-3 * loss.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_beta", [1.0, 5000.0])
def test_auto_beta_through_pair_weight(dtype, backend, base_beta):
    """docs/dropin.md's "auto beta": a beta computed from the batch, as a tensor, enters as pair_weight (no .item()):
    d = beta/2 * w * (e_ref - e), so beta=base_beta, pair_weight=(auto_beta / base_beta).expand(B)."""
    model, ref, noise = make_batch(dtype, distinct_targets=True)
    num_pairs = model.shape[0] // 2
    with torch.no_grad():  # e.g. a beta that puts the batch's mean |margin| at a fixed logit scale (a 0-dim tensor)
        gap = (ref.float() - noise.float()).pow(2).mean(dim=(1, 2, 3)) - (model.float() - noise.float()).pow(2).mean(
            dim=(1, 2, 3)
        )
        auto_beta = 2.0 / (gap[:num_pairs] - gap[num_pairs:]).abs().mean()
    expected, expected_grad = _grad_of_formula(diffusers_sdxl_loss, model, ref, noise, auto_beta.to(F64))
    assert 0.5 < expected["logits"].abs().max() < 20
    pair_weight = (auto_beta / base_beta).detach().expand(num_pairs)
    loss, stats, grad = _fused(
        model, ref, noise, backend, beta=base_beta, pair_weight=pair_weight, **trainer_conventions("diffusers_sdxl")
    )
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, dtype)


def _ties_batch(dtype, pattern, seed=3):
    """Pairs by pattern: "tie" (policy == reference on both samples: d_w = d_l = 0), "dup" (winner and loser
    identical: d_w = d_l != 0), "win" / "lose" (z > 0 / z < 0 under reverse_kl, beta > 0)."""
    num_pairs = len(pattern)
    model, ref, noise = make_batch(
        torch.float32, num_pairs=num_pairs, shape=(2, 4, 4), tie_pair=False, distinct_targets=True, seed=seed
    )
    model, ref, noise = model.to(dtype), ref.to(dtype), noise.to(dtype)
    z = diffusers_sdxl_loss(model, ref, noise, 5000.0)["logits"]
    for p, kind in enumerate(pattern):
        w, l = p, p + num_pairs
        if kind == "tie":
            ref[w], ref[l] = model[w], model[l]
        elif kind == "dup":
            model[l], ref[l], noise[l] = model[w], ref[w], noise[w]
        elif (kind == "win") != (z[p] > 0):  # swapping policy and reference negates both log-ratios
            model[[w, l]], ref[[w, l]] = ref[[w, l]].clone(), model[[w, l]].clone()
    return model, ref, noise


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
@pytest.mark.parametrize(
    "pattern, half, strict",
    [
        (("tie",), 0.5, 0.0),
        (("dup",), 0.5, 0.0),
        (("win",), 1.0, 1.0),
        (("lose",), 0.0, 0.0),
        (("tie", "win", "dup", "lose"), 0.5, 0.25),
        (("tie", "dup", "tie"), 0.5, 0.0),
    ],
    ids=["B1-tie", "B1-dup", "B1-win", "B1-lose", "B4-mixed", "B3-all-ties"],
)
def test_implicit_acc_exact_ties(backend, dtype, divergence, pattern, half, strict):
    """Issue 16: exact ties, both tie rules, B = 1 (where a 1/B tolerance would accept anything): exact values."""
    model, ref, noise = _ties_batch(dtype, pattern)
    for rule, value in (("half", half), ("strict", strict)):
        _, stats = fused_fdpo_loss(
            model,
            ref,
            noise,
            beta=5000.0,
            divergence=divergence,
            implicit_acc_ties=rule,
            return_stats=True,
            backend=backend,
        )
        ties = [p for p, kind in enumerate(pattern) if kind in ("tie", "dup")]
        assert (stats.logits[ties] == 0).all(), stats.logits
        assert stats.implicit_acc.item() == value, (rule, stats.logits)
        # and the trainers' own expressions give the same on these logits
        z = stats.logits.to(F64)
        trainer = (z > 0).sum() / z.numel() + (0.5 * (z == 0).sum() / z.numel() if rule == "half" else 0)
        assert trainer.item() == value


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_parity(backend):
    """Rows [w0, l0, w1, l1, ...] (verl-style): the same loss as the halves batch, gradient in storage order."""
    model, ref, noise = make_batch(torch.float32)
    num_pairs = model.shape[0] // 2
    expected, expected_grad = _grad_of_formula(diffusers_sdxl_loss, model, ref, noise, 5000.0)
    order = torch.stack([torch.arange(num_pairs), torch.arange(num_pairs) + num_pairs], dim=1).flatten()
    loss, stats, grad = _fused(model[order], ref[order], noise[order], backend, beta=5000.0, layout="interleaved")
    torch.testing.assert_close(loss.to(F64), expected["loss"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(stats.logits.to(F64), expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.model_err.to(F64), expected["model_err"][order], rtol=2e-6, atol=0)
    assert stats.implicit_acc.item() == pytest.approx(expected["implicit_acc"].item(), abs=1e-6)
    _assert_grad_close(grad, expected_grad[order], torch.float32)
    # A shared target is indexed by pair in either layout.
    loss_shared = fused_fdpo_loss(
        model[order], ref[order], noise[:num_pairs], beta=5000.0, layout="interleaved", backend=backend
    )
    torch.testing.assert_close(loss_shared, loss, rtol=1e-6, atol=0)


# ---- separate winner / loser tensors --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_target", [False, True], ids=["target_l", "shared"])
def test_from_pairs_matches_halves_call(backend, shared_target):
    model, ref, noise = make_batch(torch.float32)
    num_pairs = model.shape[0] // 2
    mw = model[:num_pairs].clone().requires_grad_(True)
    ml = model[num_pairs:].clone().requires_grad_(True)
    target_l = None if shared_target else noise[num_pairs:]
    loss, stats = fdpo_loss_from_pairs(
        mw,
        ml,
        ref[:num_pairs],
        ref[num_pairs:],
        noise[:num_pairs],
        target_l,
        beta=5000.0,
        return_stats=True,
        backend=backend,
    )
    loss.backward()
    ref_loss, ref_stats, ref_grad = _fused(model, ref, noise, backend, beta=5000.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.logits, ref_stats.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.model_err, ref_stats.model_err)
    torch.testing.assert_close(mw.grad, ref_grad[:num_pairs], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ml.grad, ref_grad[num_pairs:], rtol=1e-6, atol=1e-12)


def test_from_pairs_with_cached_reference_errors():
    model, ref, noise = make_batch(torch.float32)
    num_pairs = model.shape[0] // 2
    ref_err = ((ref - noise) ** 2).mean(dim=(1, 2, 3))
    loss = fdpo_loss_from_pairs(
        model[:num_pairs], model[num_pairs:], target_w=noise[:num_pairs], ref_err=ref_err, backend="torch"
    )
    expected = fused_fdpo_loss(model, target=noise, ref_err=ref_err, backend="torch")
    torch.testing.assert_close(loss, expected)


# ---- a real training step of a tiny diffusers UNet ------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The tiny UNet's ops are far too small to share out: on a busy 2-core machine one thread is 10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_unet_setup():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()  # the frozen reference
    with torch.no_grad():  # a policy a little way into fine-tuning, so the log-ratios are not all 0
        for p in unet.parameters():
            p.add_(0.005 * p.abs().mean() * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    num_pairs = 4
    latents = torch.randn(2 * num_pairs, 4, 8, 8)  # torch.cat(pixel_values.chunk(2, dim=1)) -> VAE: [w; l]
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (num_pairs,)).repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = torch.randn(num_pairs, 6, 8).repeat(2, 1, 1)
    return unet, ref_unet, (noisy, timesteps, encoder_hidden_states), noise


LR = 1e-4


def _train_step(unet, ref_pred, inputs, noise, loss_fn):
    """One step of the scripts' loop on a copy of ``unet``: forward, loss, backward, clip_grad_norm_(1.0), then
    an AdamW step (the scripts' optimizer) and, for comparison, an SGD step from the same clipped gradients."""
    unet = copy.deepcopy(unet).train()
    model_pred = unet(*inputs).sample
    loss, logs = loss_fn(model_pred, ref_pred, noise)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters()}
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    updated = {}
    for name, make in (
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=1e-2)),
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=LR)),
    ):
        model = copy.deepcopy(unet)
        for p, q in zip(model.parameters(), unet.parameters()):
            p.grad = q.grad.clone()
        make(model.parameters()).step()
        updated[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return loss.detach(), logs, grads, updated


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_unet_training_step(one_thread, tiny_unet_setup, backend):
    unet, ref_unet, inputs, noise = tiny_unet_setup
    num_pairs = noise.shape[0] // 2
    with torch.no_grad():
        ref_pred = ref_unet(*inputs).sample

    def trainer(model_pred, ref_pred, target):
        out = diffusers_sdxl_loss(model_pred, ref_pred, target, 5000.0)  # float64 evaluation
        return out["loss"], out

    def fused(model_pred, ref_pred, target):
        loss, stats = fused_fdpo_loss(
            model_pred,
            ref_pred,
            target[:num_pairs],
            beta=5000.0,
            return_stats=True,
            backend=backend,
            **trainer_conventions("diffusers_sdxl"),
        )
        return loss, trainer_logs(loss, stats)

    loss_a, logs_a, grads_a, new_a = _train_step(unet, ref_pred, inputs, noise, trainer)
    loss_b, logs_b, grads_b, new_b = _train_step(unet, ref_pred, inputs, noise, fused)
    assert 0.05 < abs(logs_a["logits"]).max().item() < 20  # a real preference signal, not all ties
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=2e-6)
    for key in ("raw_model_loss", "ref_loss", "implicit_acc"):
        assert logs_b[key].item() == pytest.approx(logs_a[key].item(), rel=2e-6), key
    total = sum(g.double().norm() ** 2 for g in grads_a.values()).sqrt().item()
    assert total > 0
    for name, ga in grads_a.items():
        torch.testing.assert_close(
            grads_b[name], ga, rtol=1e-4, atol=1e-6 * total, msg=lambda m, name=name: f"{name}: {m}"
        )
    # Updated weights. The parameter gradients agree to ~1e-5 of their scale (fp32 rounding of the UNet backward,
    # not the loss). SGD's update is lr * clipped gradient and shows exactly that. AdamW's first update is
    # lr * g / (|g| + eps), about lr * sign(g): it agrees to 1e-3 of a step except at the few entries whose
    # clipped gradient is near eps = 1e-8, where that rounding moves the update by ~1% of a step. On top: one
    # rounding of each updated weight to fp32 (its ulp).
    old = torch.cat([p.detach().flatten() for p in unet.parameters()])
    for optimizer_name in ("adamw", "sgd"):
        a, b = new_a[optimizer_name], new_b[optimizer_name]
        ulp = torch.nextafter(a.abs(), torch.tensor(float("inf"))) - a.abs()
        excess = ((b - a).abs() - 2 * ulp).clamp_min(0)  # beyond the weights' own rounding
        moved = (a - old).abs().max().item()
        if optimizer_name == "sgd":
            assert 0 < moved and excess.max().item() <= 1e-5 * moved, optimizer_name
        else:
            assert moved > 0.5 * LR  # the step really moved the weights
            assert excess.max().item() < 5e-2 * LR, optimizer_name
            assert (excess > 1e-3 * LR).float().mean().item() < 1e-3, optimizer_name


# ---- convention mismatches that can be detected get an error naming the convention ---------------------------


def test_odd_batch_names_the_layout():
    x = torch.randn(5, 4, 8, 8)
    halves = r"5 rows; the paired layout \(halves: rows 0\.\.B-1 winners, B\.\.2B-1 losers\)"
    with pytest.raises(ValueError, match=halves):
        fused_fdpo_loss(x, x.clone(), x.clone(), backend="torch")
    with pytest.raises(ValueError, match=r"\(interleaved: rows \[w0, l0, w1, l1, \.\.\.\]\) needs an even"):
        fused_fdpo_loss(x, x.clone(), x.clone(), layout="interleaved", backend="torch")


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_target_of_wrong_size_names_the_layout(layout):
    x = torch.randn(8, 4, 8, 8)
    with pytest.raises(
        ValueError,
        match=rf"target has shape \(3, 4, 8, 8\); expected \(8, 4, 8, 8\) \(one per "
        rf"sample\) or \(4, 4, 8, 8\) \(shared by winner and loser of each pair, "
        rf"{layout} layout\)",
    ):
        fused_fdpo_loss(x, x.clone(), x[:3].clone(), layout=layout, backend="torch")
    with pytest.raises(ValueError, match=rf"target has shape \(8, 4, 8, 4\).*{layout} layout"):
        fused_fdpo_loss(x, x.clone(), x[..., :4].clone(), layout=layout, backend="torch")


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_mask_of_wrong_shape_names_the_layout(layout):
    x = torch.randn(8, 4, 8, 8)
    with pytest.raises(
        ValueError,
        match=rf"mask has shape \(2, 4, 8, 8\); expected \(8, 4, 8, 8\) or shared "
        rf"\(4, 4, 8, 8\) \({layout} layout\)",
    ):
        fused_fdpo_loss(x, x.clone(), x.clone(), mask=torch.ones(2, 4, 8, 8), layout=layout, backend="torch")


def test_ref_err_and_pair_weight_shapes():
    x = torch.randn(8, 4, 8, 8)
    with pytest.raises(ValueError, match=r"ref_err must have shape \[2B\] = \(8,\), one error per sample"):
        fused_fdpo_loss(x, target=x.clone(), ref_err=torch.zeros(4), backend="torch")
    with pytest.raises(ValueError, match=r"pair_weight must have shape \[B\] = \(4,\), one weight per pair"):
        fused_fdpo_loss(x, x.clone(), x.clone(), pair_weight=torch.ones(8), backend="torch")


def test_from_pairs_bad_input():
    w, l = torch.randn(4, 4, 8, 8), torch.randn(3, 4, 8, 8)
    mismatch = r"model_w has shape \(4, 4, 8, 8\) but model_l has \(3, 4, 8, 8\); winners and losers"
    with pytest.raises(ValueError, match=mismatch):
        fdpo_loss_from_pairs(w, l, w.clone(), l.clone(), w.clone())
    with pytest.raises(ValueError, match=r"ref_w has shape .* but ref_l has"):
        fdpo_loss_from_pairs(w, w.clone(), w.clone(), l.clone(), w.clone())
    with pytest.raises(ValueError, match=r"target_w has shape .* but target_l has"):
        fdpo_loss_from_pairs(w, w.clone(), w.clone(), w.clone(), w.clone(), l.clone())
    with pytest.raises(ValueError, match=r"assembles the halves layout .* got layout='interleaved'"):
        fdpo_loss_from_pairs(w, w.clone(), w.clone(), w.clone(), w.clone(), layout="interleaved")
    with pytest.raises(ValueError, match=r"pass both ref_w and ref_l"):
        fdpo_loss_from_pairs(w, w.clone(), w.clone(), None, w.clone())
    with pytest.raises(ValueError, match=r"target_w is required"):
        fdpo_loss_from_pairs(w, w.clone(), w.clone(), w.clone())
    with pytest.raises(TypeError, match=r"model_l must be a torch.Tensor"):
        fdpo_loss_from_pairs(w, None, w.clone(), w.clone(), w.clone())


def test_unknown_trainer_conventions():
    with pytest.raises(ValueError, match=r"unknown trainer 'sd21'; expected one of \['diffusers_sd15'"):
        trainer_conventions("sd21")
    conv = trainer_conventions("diffusers_sd15")
    conv["beta_convention"] = "half"  # a copy: the table is not changed
    assert TRAINER_CONVENTIONS["diffusers_sd15"]["beta_convention"] == "full"


# ---- issue 23, item 6: presets for more trainers (conventions, not new heads) --------------------------------


def _flow_batch(dtype, num_pairs=4, shape=(4, 8, 8), seed=11, spread=0.3, delta=0.01):
    """target = noise - latents with the noise shared by a pair (flow_grpo, SimpleTuner): a distinct [2B] target."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2 * num_pairs, *shape, generator=g)
    noise = torch.randn(num_pairs, *shape, generator=g).repeat(2, *([1] * len(shape)))
    target = (noise - latents).to(dtype)
    model = (target.float() + spread * torch.randn(target.shape, generator=g)).to(dtype)
    ref = (model.float() + delta * torch.randn(target.shape, generator=g)).to(dtype)
    return model, ref, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conventions", ["diffusion_npo_sd15", "diffusion_npo_sdxl"])
def test_diffusion_npo_swap(backend, conventions):
    """G-U-N/Diffusion-NPO@a14f1dbc: DPO-DPO-NPO/train_sd15.py flips the pairs where the batch is built (label_0 == 1,
    :688), then runs diffusers' loss lines. From a [preferred; dispreferred] batch the NPO loss is the DPO formula on
    the swapped halves: the fused loss on the swapped rows, or fdpo_loss_from_pairs with the losers first."""
    formula = diffusers_sd15_loss if conventions.endswith("sd15") else diffusers_sdxl_loss
    beta = 500.0
    model, ref, noise = make_batch(torch.float32, distinct_targets=True, tie_pair=False)
    num_pairs = model.shape[0] // 2
    swap = torch.cat([torch.arange(num_pairs, 2 * num_pairs), torch.arange(num_pairs)])
    expected, expected_grad = _grad_of_formula(formula, model[swap], ref[swap], noise[swap], beta)
    kwargs = trainer_conventions(conventions)
    loss, stats, grad = _fused(model[swap], ref[swap], noise[swap], backend, beta=beta, **kwargs)
    _assert_stats_match(loss, stats, expected, num_pairs)
    _assert_grad_close(grad, expected_grad, torch.float32)
    mw, ml = model[:num_pairs], model[num_pairs:]
    pairs = fdpo_loss_from_pairs(
        ml,
        mw,
        ref[num_pairs:],
        ref[:num_pairs],
        noise[num_pairs:],
        noise[:num_pairs],
        beta=beta,
        backend=backend,
        **kwargs,
    )
    torch.testing.assert_close(pairs, loss, rtol=1e-6, atol=0)
    # NPO's logit is DPO's negated: the swap is not a no-op.
    dpo = formula(model, ref, noise, beta)
    torch.testing.assert_close(expected["logits"], -dpo["logits"], rtol=1e-12, atol=1e-12)
    assert abs(expected["loss"].item() - dpo["loss"].item()) > 1e-3


def flow_grpo_sd3_dpo_loss(model_pred, ref_pred, target, beta):
    """yifan123/flow_grpo@ac4c86e8:scripts/train_sd3_dpo.py:924-950 (``.float()`` casts become float64 here)."""
    bsz = target.shape[0] // 2
    theta_mse = ((model_pred.to(F64) - target.to(F64)) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    ref_mse = ((ref_pred.to(F64) - target.to(F64)) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    model_w_err, model_l_err = theta_mse[:bsz], theta_mse[bsz:]
    ref_w_err, ref_l_err = ref_mse[:bsz], ref_mse[bsz:]
    w_diff = model_w_err - ref_w_err
    l_diff = model_l_err - ref_l_err
    inside_term = -0.5 * beta * (w_diff - l_diff)
    return dict(
        loss=torch.mean(-F.logsigmoid(inside_term)),
        model_w_err=model_w_err.mean(),
        model_l_err=model_l_err.mean(),
        ref_w_err=ref_w_err.mean(),
        ref_l_err=ref_l_err.mean(),
        inside_term=inside_term,
        implicit_acc=(inside_term > 0).sum().to(F64) / inside_term.size(0),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flow_grpo_sd3_dpo_parity(dtype, backend):
    model, ref, target = _flow_batch(dtype)
    num_pairs = model.shape[0] // 2
    ref[0], ref[num_pairs] = model[0], model[num_pairs]  # one exact tie: the strict rule counts it as a loss
    beta = 4000.0  # config.train.beta is 100 for SD3.5; this tiny batch needs more for logits of order 1
    out, expected_grad = _grad_of_formula(flow_grpo_sd3_dpo_loss, model, ref, target, beta)
    assert 0.3 < out["inside_term"].abs().max() < 20 and (out["inside_term"] == 0).sum() == 1
    loss, stats, grad = _fused(model, ref, target, backend, beta=beta, **trainer_conventions("flow_grpo_sd3_dpo"))
    torch.testing.assert_close(loss.to(F64), out["loss"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(stats.logits.to(F64), out["inside_term"], rtol=1e-5, atol=1e-5)
    # its logged statistics, from the fused per-sample errors
    ew, el = stats.model_err.to(F64).chunk(2)
    rw, rl = stats.ref_err.to(F64).chunk(2)
    for key, value in (("model_w_err", ew), ("model_l_err", el), ("ref_w_err", rw), ("ref_l_err", rl)):
        torch.testing.assert_close(value.mean(), out[key], rtol=2e-6, atol=0, msg=key)
    assert stats.implicit_acc.item() == pytest.approx(out["implicit_acc"].item(), abs=1e-6)
    _assert_grad_close(grad, expected_grad, dtype)
    assert_each_target_half_counts(
        flow_grpo_sd3_dpo_loss, model, ref, target, beta, backend, **trainer_conventions("flow_grpo_sd3_dpo")
    )


def onetrainer_dpo_loss(model_pred, ref_pred, target, beta, label_smoothing=0.0, ipo_tau=None):
    """Nerogar/OneTrainer PR #1403, BaseModelSetup.calculate_dpo_loss (fp32 accumulation becomes float64 here)."""
    chosen_b = model_pred.shape[0] // 2

    def mse_per_sample(pred, tgt):
        return (pred.to(F64) - tgt.to(F64)).pow(2).mean(dim=list(range(1, pred.ndim)))

    with torch.no_grad():
        ref_chosen_logp = -mse_per_sample(ref_pred[:chosen_b], target[:chosen_b])
        ref_rejected_logp = -mse_per_sample(ref_pred[chosen_b:], target[chosen_b:])
    policy_chosen_logp = -mse_per_sample(model_pred[:chosen_b], target[:chosen_b])
    policy_rejected_logp = -mse_per_sample(model_pred[chosen_b:], target[chosen_b:])
    chosen_ratio = policy_chosen_logp - ref_chosen_logp
    rejected_ratio = policy_rejected_logp - ref_rejected_logp
    margin = chosen_ratio - rejected_ratio
    if ipo_tau is not None:
        loss = (margin - 1.0 / (2.0 * ipo_tau)).pow(2).mean()
        logits = margin
    else:
        logits = beta * margin
        loss = -F.logsigmoid(logits).mean()
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss + label_smoothing * (-F.logsigmoid(-logits).mean())
    return dict(
        loss=loss,
        logits=logits,
        chosen_reward=chosen_ratio.mean(),
        rejected_reward=rejected_ratio.mean(),
        reward_margin=margin.mean(),
        accuracy=(chosen_ratio > rejected_ratio).to(F64).mean(),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", ["sigmoid", "label_smoothing", "ipo"])
def test_onetrainer_dpo_parity(dtype, backend, objective):
    """logits = beta * margin (beta_convention="full"), strict accuracy; label smoothing and IPO as documented."""
    if objective == "ipo" and dtype == torch.float16:
        pytest.skip("IPO's gradient on this batch is ~1e-6, subnormal in float16 (the dtype's range, not the loss)")
    model, ref, noise = make_batch(dtype, distinct_targets=True)
    num_pairs = model.shape[0] // 2
    beta = 2500.0
    kwargs = trainer_conventions("onetrainer_dpo")
    formula_kwargs = {}
    if objective == "label_smoothing":
        kwargs["label_smoothing"] = formula_kwargs["label_smoothing"] = 0.1
    elif objective == "ipo":
        tau = 500.0
        formula_kwargs["ipo_tau"] = tau
        kwargs.update(loss_type="ipo", ipo_tau=tau)
        beta = 1.0  # the margin is not scaled by beta

    def formula(m, r, t, b):
        return onetrainer_dpo_loss(m, r, t, b, **formula_kwargs)

    out, expected_grad = _grad_of_formula(formula, model, ref, noise, beta)
    assert (out["logits"] == 0).sum() == 1
    loss, stats, grad = _fused(model, ref, noise, backend, beta=beta, **kwargs)
    torch.testing.assert_close(loss.to(F64), out["loss"], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(
        stats.logits.to(F64), out["logits"], rtol=1e-5, atol=1e-5 * out["logits"].abs().max().item()
    )
    assert stats.implicit_acc.item() == pytest.approx(out["accuracy"].item(), abs=1e-6)
    # its logged rewards are the raw log-ratios e_ref - e, beta-free: stats.logratio is beta * (e_ref - e)
    gap = (stats.logratio.to(F64) / beta).chunk(2)
    torch.testing.assert_close(gap[0].mean(), out["chosen_reward"], rtol=1e-5, atol=1e-5 / beta)
    torch.testing.assert_close(gap[1].mean(), out["rejected_reward"], rtol=1e-5, atol=1e-5 / beta)
    torch.testing.assert_close(gap[0].mean() - gap[1].mean(), out["reward_margin"], rtol=1e-5, atol=1e-5 / beta)
    _assert_grad_close(grad, expected_grad, dtype)
    del num_pairs


def simpletuner_flow_dpo_loss(mask, norm_type):
    """bghira/SimpleTuner@7d475ed3 (PR #2709): flow_dpo/distiller.py:88-103 and _per_sample_error (:230-255), on
    rows [preferred; rejected]; ``mask`` is its [B, 1, H, W] loss mask (one per pair), fixed beta."""

    def per_sample_error(prediction, target, m):
        error = (prediction.to(F64) - target.to(F64)).pow(2)
        error = error * m.to(F64)
        dims = tuple(range(1, error.dim()))
        if norm_type == "sum":
            return error.sum(dim=dims)
        if norm_type == "mean":
            return error.mean(dim=dims)
        denominator = m.to(F64).expand_as(error).sum(dim=dims)
        return error.sum(dim=dims) / denominator.clamp_min(1.0)

    def formula(model_pred, ref_pred, target, beta):
        b = model_pred.shape[0] // 2
        policy_win_err = per_sample_error(model_pred[:b], target[:b], mask)
        policy_lose_err = per_sample_error(model_pred[b:], target[b:], mask)
        with torch.no_grad():
            ref_win_err = per_sample_error(ref_pred[:b], target[:b], mask)
            ref_lose_err = per_sample_error(ref_pred[b:], target[b:], mask)
        win_adv = ref_win_err - policy_win_err
        lose_adv = policy_lose_err - ref_lose_err
        margin = win_adv + lose_adv
        logits = 0.5 * beta * margin
        return dict(
            loss=-F.logsigmoid(logits).mean(),
            logits=logits,
            margin=margin.mean(),
            win_adv=win_adv.mean(),
            lose_adv=lose_adv.mean(),
            negative_margin_pct=(margin < 0).to(F64).mean() * 100.0,
            gradient_factor=torch.sigmoid(-logits).mean(),
        )

    return formula


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "norm_type, conventions, beta",
    [
        ("sum", "simpletuner_flow", 40.0),
        ("mean", "simpletuner_flow_mean", 10000.0),
        ("masked_mean", "simpletuner_flow_masked_mean", 5000.0),
    ],
)
def test_simpletuner_merged_flow_dpo(dtype, backend, norm_type, conventions, beta):
    """The merged Flow-DPO with its [B, 1, H, W] mask (passed expanded to [B, C, H, W], shared by the pair) and
    separate preferred / rejected tensors (fdpo_loss_from_pairs). One pair's mask is empty: 0 error both ways."""
    model, ref, target = _flow_batch(dtype)
    num_pairs, shape = model.shape[0] // 2, model.shape[1:]
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(num_pairs, 1, *shape[1:], generator=g) > 0.5).float()
    mask[0] = 0.0
    formula = simpletuner_flow_dpo_loss(mask, norm_type)
    out, expected_grad = _grad_of_formula(formula, model, ref, target, beta)
    assert 0.3 < out["logits"].abs().max() < 20
    mw = model[:num_pairs].detach().clone().requires_grad_(True)
    ml = model[num_pairs:].detach().clone().requires_grad_(True)
    loss, stats = fdpo_loss_from_pairs(
        mw,
        ml,
        ref[:num_pairs],
        ref[num_pairs:],
        target[:num_pairs],
        target[num_pairs:],
        beta=beta,
        mask=mask.expand(num_pairs, *shape),
        return_stats=True,
        backend=backend,
        **trainer_conventions(conventions),
    )
    loss.backward()
    torch.testing.assert_close(loss.to(F64), out["loss"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(stats.logits.to(F64), out["logits"], rtol=1e-5, atol=1e-5)
    gap = (stats.logratio.to(F64) / (0.5 * beta)).chunk(2)  # d = beta/2 * (e_ref - e)
    torch.testing.assert_close(gap[0].mean(), out["win_adv"], rtol=1e-5, atol=1e-5 / beta)
    torch.testing.assert_close(-gap[1].mean(), out["lose_adv"], rtol=1e-5, atol=1e-5 / beta)
    z = stats.logits.to(F64)
    assert (100.0 * (z < 0).to(F64).mean()).item() == pytest.approx(out["negative_margin_pct"].item())
    torch.testing.assert_close(torch.sigmoid(-z).mean(), out["gradient_factor"], rtol=1e-5, atol=1e-7)
    grad = torch.cat([mw.grad, ml.grad])
    live = torch.ones(2 * num_pairs, dtype=torch.bool)
    live[[0, num_pairs]] = False  # the pair with the empty mask: no gradient at all
    assert (grad[~live] == 0).all() and (expected_grad[~live] == 0).all()
    _assert_grad_close(grad[live], expected_grad[live], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kohya_dpo_masked_loss_is_mean_all(backend):
    """kohya's apply_masked_loss multiplies the element losses by the mask before the per-sample .mean(): the
    masked sum over all elements, err_reduction="mean_all" (not the preset's masked mean)."""
    model, ref, noise = make_batch(torch.float32, distinct_targets=True, tie_pair=False)
    num_pairs = model.shape[0] // 2
    g = torch.Generator().manual_seed(6)
    mask_rows = (torch.rand(model.shape[0], 1, *model.shape[2:], generator=g) > 0.3).float()
    dims = list(range(1, model.dim()))

    def formula(pred, ref_pred, target, beta):
        e = (F.mse_loss(pred.to(F64), target.to(F64), reduction="none") * mask_rows.to(F64)).mean(dims)
        with torch.no_grad():
            r = (F.mse_loss(ref_pred.to(F64), target.to(F64), reduction="none") * mask_rows.to(F64)).mean(dims)
        (ew, el), (rw, rl) = e.chunk(2), r.chunk(2)
        return dict(loss=(-F.logsigmoid(-0.5 * beta * ((ew - el) - (rw - rl)))).mean())

    beta = 8000.0
    out, expected_grad = _grad_of_formula(formula, model, ref, noise, beta)
    kwargs = dict(trainer_conventions("kohya_dpo"), err_reduction="mean_all")
    loss, _, grad = _fused(model, ref, noise, backend, beta=beta, mask=mask_rows.expand_as(model), **kwargs)
    torch.testing.assert_close(loss.to(F64), out["loss"], rtol=2e-6, atol=1e-7)
    _assert_grad_close(grad, expected_grad, torch.float32)
    del num_pairs


def test_every_preset_is_valid():
    """Each preset's keys are options of fused_fdpo_loss and it runs (the reference-free MaPO preset without a
    reference)."""
    model, ref, noise = make_batch(torch.float32, num_pairs=2, shape=(2, 4, 4))
    for name in TRAINER_CONVENTIONS:
        kwargs = trainer_conventions(name)
        assert set(kwargs) <= set(OPTIONS), name
        reference = None if kwargs.get("loss_type") == "mapo" else ref
        loss = fused_fdpo_loss(model, reference, noise, beta=1.0, backend="torch", **kwargs)
        assert torch.isfinite(loss), name


def test_presets_cite_their_trainer():
    """Every preset added for issue 23 pins the commit of the trainer's loss lines in its comment."""
    import inspect

    from fdiv_kernels import integrations

    source = inspect.getsource(integrations)
    for name, commit in (
        ("diffusion_npo_sd15", "G-U-N/Diffusion-NPO@a14f1dbc"),
        ("inpo", "JaydenLyh/InPO@a9cfc4de"),
        ("flow_grpo_sd3_dpo", "yifan123/flow_grpo@ac4c86e8"),
        ("kohya_dpo", "rockerBOO/sd-scripts@6e124dcc"),
        ("simpletuner_flow_masked_mean", "bghira/SimpleTuner@7d475ed3"),
    ):
        at = source.index(f'"{name}":')
        assert commit in source[at - 900 : at], name
