"""Bad input gets a clear error that names the argument and the fix, in the fused loss and the reference alike."""

import pytest
import torch

from fdiv_kernels import FDPOLoss, fdpo_loss_reference, fused_fdpo_loss

LOSSES = [
    pytest.param(lambda *a, **k: fused_fdpo_loss(*a, backend="torch", **k), id="fused"),
    pytest.param(fdpo_loss_reference, id="reference"),
]


def _inputs(rows=4, shape=(3, 5, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(rows, *shape, generator=g, dtype=dtype)
    return (
        pred,
        pred + 0.01 * torch.randn(rows, *shape, generator=g, dtype=dtype),
        torch.randn(rows, *shape, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (
            lambda a: a.update(model_pred=a["model_pred"][:3], ref_pred=a["ref_pred"][:3], target=a["target"][:3]),
            ValueError,
            r"model_pred has 3 rows; the paired layout \(halves: rows 0..B-1 winners",
        ),
        (
            lambda a: a.update(
                model_pred=a["model_pred"][:3], ref_pred=a["ref_pred"][:3], target=a["target"][:3], layout="interleaved"
            ),
            ValueError,
            r"3 rows; the paired layout \(interleaved",
        ),
        (
            lambda a: a.update(ref_pred=a["ref_pred"][:, :2]),
            ValueError,
            r"ref_pred has shape \(4, 2, 5, 7\) but model_pred",
        ),
        (lambda a: a.update(target=a["target"][:3]), ValueError, r"target has shape \(3, 3, 5, 7\); expected"),
        (
            lambda a: a.update(target=a["target"][:, :, :4]),
            ValueError,
            r"target has shape .*\(shared by winner and loser of each pair, halves layout\)",
        ),
        (
            lambda a: a.update(ref_pred=a["ref_pred"].double()),
            TypeError,
            r"ref_pred is float64 but model_pred is torch.float32",
        ),
        (
            lambda a: a.update(target=a["target"].double()),
            TypeError,
            r"target is float64 but model_pred is torch.float32",
        ),
        (lambda a: a.update(mask=torch.ones_like(a["target"], dtype=torch.float64)), TypeError, r"mask is float64"),
        (lambda a: a.update(target=a["target"].to(torch.int32)), TypeError, r"target must be a floating-point tensor"),
        (
            lambda a: a.update(model_pred=a["model_pred"].to(torch.int64)),
            TypeError,
            r"model_pred must be float32, float16, bfloat16",
        ),
        (
            lambda a: a.update(mask=a["target"] > 0),
            TypeError,
            r"mask must be a floating-point tensor; got torch.bool: pass mask.to\(model_pred.dtype\)",
        ),
        (lambda a: a.update(model_pred=a["model_pred"][0]), ValueError, r"model_pred has 3 rows"),
        (lambda a: a.update(model_pred=torch.randn(4)), ValueError, r"model_pred must have shape \[2B, \.\.\.\]"),
        (lambda a: a.update(divergence="nope"), ValueError, r"unknown divergence='nope'; expected one of"),
        (
            lambda a: a.update(divergence="chi2"),
            ValueError,
            r"divergence='chi2' violates the f-DPO condition: Pearson chi-squared .* domain contains 0",
        ),
        (
            lambda a: a.update(divergence="tv"),
            ValueError,
            r"divergence='tv' violates the f-DPO condition: total variation .* not invertible",
        ),
        (lambda a: a.update(divergence="alpha", alpha=1.0), ValueError, r"alpha=1.0 is outside \(0, 1\)"),
        (lambda a: a.update(divergence="alpha", alpha=0.0), ValueError, r"alpha=0.0 is outside \(0, 1\)"),
        (lambda a: a.update(divergence="alpha", alpha="0.5"), TypeError, r"alpha must be a float"),
        (lambda a: a.update(ref_err=torch.rand(4)), ValueError, r"pass exactly one of ref_pred .* got both"),
        (lambda a: a.update(ref_pred=None), ValueError, r"pass exactly one of ref_pred .* got neither"),
        (
            lambda a: a.update(ref_pred=None, ref_err=torch.rand(2)),
            ValueError,
            r"ref_err must have shape \[2B\] = \(4,\), one error per sample in model_pred.s row order "
            r"\(halves layout: winners first",
        ),
        (
            lambda a: a.update(ref_pred=a["ref_pred"].requires_grad_()),
            ValueError,
            r"ref_pred requires grad, .* pass ref_pred.detach\(\)",
        ),
        (lambda a: a.update(target=a["target"].requires_grad_()), ValueError, r"target requires grad"),
        (lambda a: a.update(target=None), ValueError, r"target is required"),
        (lambda a: a.update(beta=-1.0), ValueError, r"beta must be > 0; got -1.0"),
        (lambda a: a.update(beta=float("nan")), ValueError, r"beta must be finite"),
        (lambda a: a.update(gamma=0.0), ValueError, r"gamma must be > 0"),
        (lambda a: a.update(label_smoothing=0.5), ValueError, r"label_smoothing must be in \[0, 0.5\)"),
        (lambda a: a.update(logratio_clip=0.0), ValueError, r"logratio_clip must be > 0"),
        (
            lambda a: a.update(reduction="avg"),
            ValueError,
            r"reduction='avg' is not supported; expected one of \['none', 'mean', 'sum'\]",
        ),
        (lambda a: a.update(err_reduction="max"), ValueError, r"err_reduction='max' is not supported"),
        (lambda a: a.update(layout="pairs"), ValueError, r"layout='pairs' is not supported"),
        (lambda a: a.update(beta_convention="x"), ValueError, r"beta_convention='x' is not supported"),
        (lambda a: a.update(pair_weight=torch.rand(4)), ValueError, r"pair_weight must have shape \[B\] = \(2,\)"),
        (lambda a: a.update(mask=torch.rand(3, 3, 5, 7)), ValueError, r"mask has shape \(3, 3, 5, 7\); expected"),
        (
            lambda a: a.update(ref_pred=a["ref_pred"].to("meta")),
            ValueError,
            r"ref_pred is on meta but model_pred is on cpu",
        ),
        # Issue 25: a clip that is 0 or subnormal in float32 was silently off on cpu (1e-46 rounds to 0).
        (lambda a: a.update(logratio_clip=1e-46), ValueError, r"logratio_clip=1e-46 is below the smallest normal"),
        (lambda a: a.update(logratio_clip=1e-40), ValueError, r"logratio_clip=1e-40 is below the smallest normal"),
        # ipo_tau = 1e-30: margin 5e29, whose square (the loss) is +inf for every logit.
        (
            lambda a: a.update(loss_type="ipo", ipo_tau=1e-30),
            ValueError,
            r"ipo_tau=1e-30 gives a margin .* beyond float32's range",
        ),
        # float64 vectors beside a float32 model_pred are rounded to float32: beyond its range they would be inf.
        (
            lambda a: a.update(pair_weight=torch.tensor([1.0, 1e39], dtype=torch.float64)),
            ValueError,
            r"pair_weight holds 1e\+39, beyond float32's range",
        ),
        (
            lambda a: a.update(ref_pred=None, ref_err=torch.tensor([1.0, 2.0, -3e39, 1.0], dtype=torch.float64)),
            ValueError,
            r"ref_err holds -3e\+39, beyond float32's range",
        ),
        (
            lambda a: a.update(model_pred=a["model_pred"].to_sparse()),
            TypeError,
            r"model_pred has layout torch.sparse_coo; pass a dense tensor",
        ),
        (
            lambda a: a.update(mask=torch.ones(4, 3, 5, 7).to_sparse()),
            TypeError,
            r"mask has layout torch.sparse_coo; pass a dense tensor",
        ),
        (
            lambda a: a.update(model_pred=torch.nested.nested_tensor(list(a["model_pred"]))),
            TypeError,
            r"model_pred is a nested tensor; pass a dense one",
        ),
        (
            lambda a: a.update(target=torch.nested.nested_tensor(list(a["target"]))),
            TypeError,
            r"target is a nested tensor; pass a dense one",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
def test_bad_input_message(loss_fn, mutate, error, message):
    pred, ref, target = _inputs()
    args = dict(model_pred=pred, ref_pred=ref, target=target)
    mutate(args)
    with pytest.raises(error, match=message):
        loss_fn(args.pop("model_pred"), args.pop("ref_pred"), args.pop("target"), **args)


def test_unknown_backend():
    pred, ref, target = _inputs()
    with pytest.raises(ValueError, match=r"unknown backend='fast'; expected one of"):
        fused_fdpo_loss(pred, ref, target, backend="fast")


def test_unavailable_backend_is_an_error_not_a_fallback():
    pred, ref, target = _inputs()
    with pytest.raises(
        RuntimeError, match=r"backend='cuda' is unavailable: backend='cuda' runs on CUDA tensors; these are on cpu"
    ):
        fused_fdpo_loss(pred, ref, target, backend="cuda")


def test_float64_needs_a_float64_capable_backend():
    pred, ref, target = _inputs(dtype=torch.float64)
    # TypeError where Triton can run on these tensors, RuntimeError where it cannot: both name the backend.
    with pytest.raises((TypeError, RuntimeError), match=r"backend='triton'"):
        fused_fdpo_loss(pred, ref, target, backend="triton")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"violates the f-DPO condition"):
        FDPOLoss(divergence="chi2")
    with pytest.raises(ValueError, match=r"alpha=1.5 is outside"):
        FDPOLoss(divergence="alpha", alpha=1.5)


# ---------------------------------------------------------------------------------------------------------------
# The options are declared once (fdiv_kernels/options.py): the entry points' signatures and docs come from there.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [fused_fdpo_loss, FDPOLoss, fdpo_loss_reference], ids=lambda f: f.__name__)
def test_entry_points_take_the_declared_options_by_keyword_with_their_defaults_and_docs(entry):
    import inspect

    from fdiv_kernels.options import OPTIONS

    params = inspect.signature(entry).parameters
    doc = " ".join(entry.__doc__.split())
    for name, option in OPTIONS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == option.default, name
        assert " ".join(f"{name}: {option.metadata['doc']}".split()) in doc, name
    assert not [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    positional = [p.name for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == ([] if entry is FDPOLoss else ["model_pred", "ref_pred", "target"])


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_options_are_keyword_only_and_unknown_ones_are_named(loss_fn):
    pred, ref, target = _inputs()
    with pytest.raises(TypeError):
        loss_fn(pred, ref, target, None, 5000.0)  # a fourth positional argument is no option
    with pytest.raises(TypeError, match="unknown option 'err_reductoin'"):
        loss_fn(pred, ref, target, err_reductoin="sum")


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_every_default_passed_explicitly_is_the_default(loss_fn):
    from fdiv_kernels.options import DEFAULTS

    pred, ref, target = _inputs()
    torch.testing.assert_close(loss_fn(pred, ref, target, **DEFAULTS), loss_fn(pred, ref, target), rtol=0, atol=0)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_torch_func_transforms_are_refused_naming_the_argument(loss_fn):
    """torch.func.grad reached an internal autograd.Function error (issue 25); now a message naming model_pred."""
    pred, ref, target = _inputs()
    with pytest.raises(TypeError, match=r"model_pred comes from a torch.func transform \(grad, vmap"):
        torch.func.grad(lambda p: loss_fn(p, ref, target))(pred)


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize(
    "option, value, extra",
    [
        ("beta", 1234.5, {}),
        ("alpha", 0.3, {"divergence": "alpha"}),
        ("gamma", 1.7, {}),
        ("label_smoothing", 0.1, {}),
        ("logratio_clip", 2.5, {}),
        ("ipo_tau", 0.2, {"loss_type": "ipo"}),
        ("dmpo_alpha", 0.3, {"loss_type": "dmpo"}),
    ],
)
def test_numpy_scalars_are_accepted_for_every_float_option(loss_fn, option, value, extra):
    """alpha=np.float32(0.3) raised TypeError (issue 25): every float option takes NumPy scalars, with the result
    of the same value as a Python float."""
    np = pytest.importorskip("numpy")
    pred, ref, target = _inputs()
    for numpy_type in (np.float32, np.float64):
        got = loss_fn(pred, ref, target, **{"beta": 50.0, **extra, option: numpy_type(value)})
        want = loss_fn(pred, ref, target, **{"beta": 50.0, **extra, option: float(numpy_type(value))})
        assert torch.equal(got, want), (option, numpy_type)
