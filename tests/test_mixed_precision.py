"""Mixed input dtypes, as trainers really call the loss: each of model_pred, ref_pred, target and mask in its own
dtype (Accelerate hands the loss fp32 predictions holding bf16/fp16 values beside a bf16 target and reference).

Every backend must read each input in its own dtype and give exactly what it gives when every input is cast to
fp32 first (fp64 for a fp64 model_pred), with the gradient in model_pred's dtype; and both must be close to the
float64 reference.
"""

import itertools

import pytest
import torch
from harness import TOL, assert_close, cpu_backend_params

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
LOW = (F32, F16, BF16)


BACKENDS = cpu_backend_params()  # tests/harness.py: skip marks with the backend registry's reason


def _round_through(x, dtypes):
    """x rounded through every dtype in ``dtypes`` until each of them holds it exactly."""
    for _ in range(4):
        for dtype in dtypes:
            x = x.to(dtype).to(F64)
        if all(torch.equal(x.to(dtype).to(F64), x) for dtype in dtypes):
            return x
    raise AssertionError(f"no value set exact in all of {dtypes}")


def _inputs(dtypes, B=3, shape=(3, 5, 7), shared_target=False, seed=0):
    """fp64 master values, each input cast once to its own dtype; model_pred's values are first rounded through the
    lower precisions among the others' dtypes, as Accelerate's autocast hands the loss fp32 predictions holding
    bf16/fp16 values. The other inputs keep the full precision of their own dtype, so that a kernel reading one
    of them in another dtype would change its value and fail the comparison."""
    pred_t, ref_t, target_t, mask_t = dtypes
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g, dtype=F64)
    lower = [t for t in (ref_t, target_t, mask_t) if t is not None and torch.finfo(t).eps > torch.finfo(pred_t).eps]
    pred = _round_through(pred, lower)
    ref = pred + 0.05 * torch.randn(pred.shape, generator=g, dtype=F64)
    target = torch.randn(B if shared_target else 2 * B, *shape, generator=g, dtype=F64)
    mask = None if mask_t is None else torch.rand(target.shape, generator=g, dtype=F64)
    return (pred.to(pred_t), ref.to(ref_t), target.to(target_t), None if mask is None else mask.to(mask_t))


def _call(backend, pred, ref, target, mask, **kwargs):
    pred = pred.detach().clone().requires_grad_()
    loss, stats = fused_fdpo_loss(
        pred, ref, target, mask=mask, divergence="js", beta=400.0, return_stats=True, backend=backend, **kwargs
    )
    loss.backward()
    return loss, stats, pred.grad


def _assert_identical(mixed, cast, backend):
    (loss_m, stats_m, grad_m), (loss_c, stats_c, grad_c) = mixed, cast
    assert torch.equal(loss_m, loss_c)
    for name, value in stats_m.as_dict().items():
        assert torch.equal(value, getattr(stats_c, name)), name
    if backend == "triton" and grad_m.dtype in (F16, BF16):
        # Triton's interpreter truncates fp32 -> 16-bit stores where torch's .to() rounds to nearest: one ulp.
        torch.testing.assert_close(grad_m.float(), grad_c.float(), rtol=torch.finfo(grad_m.dtype).eps, atol=1e-30)
    else:
        assert torch.equal(grad_m, grad_c)


DTYPE_CASES = [(p, r, t, None) for p, r, t in itertools.product(LOW, LOW, LOW) if len({p, r, t}) > 1]
DTYPE_CASES += [(F32, BF16, BF16, BF16), (F32, F32, F32, F16), (BF16, BF16, BF16, F32), (F16, F32, BF16, F16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=lambda d: "-".join(str(x).split(".")[-1] for x in d))
@pytest.mark.parametrize("shared_target", [False, True], ids=["target2B", "sharedB"])
def test_mixed_dtypes_equal_casting_to_fp32_first(backend, dtypes, shared_target):
    if backend == "triton" and (shared_target or dtypes[3] is not None) and dtypes[0] != F32:
        pytest.skip("interpreter time: the Triton kernels specialize per pointer dtype alike; a subset suffices")
    pred, ref, target, mask = _inputs(dtypes, shared_target=shared_target)
    mixed = _call(backend, pred, ref, target, mask)
    cast = _call(backend, pred.float(), ref.float(), target.float(), None if mask is None else mask.float())
    assert mixed[2].dtype == pred.dtype
    _assert_identical(mixed, (cast[0], cast[1], cast[2].to(pred.dtype)), backend)

    exact = _call_reference(pred, ref, target, mask)
    torch.testing.assert_close(mixed[0], exact[0].float(), rtol=1e-5, atol=1e-6)
    assert_close(mixed[2], exact[2], TOL[pred.dtype].grad, "grad", row_scale=True)  # each row by its own scale


def _call_reference(pred, ref, target, mask):
    pred = pred.double().requires_grad_()
    loss, stats = fdpo_loss_reference(
        pred,
        ref.double(),
        target.double(),
        mask=None if mask is None else mask.double(),
        divergence="js",
        beta=400.0,
        return_stats=True,
    )
    loss.backward()
    return loss, stats, pred.grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("others", [F32, BF16, F16])
def test_float64_model_pred_with_lower_precision_inputs(backend, others):
    """fp64 arithmetic for a fp64 model_pred, whatever the others' dtypes (cpu and torch run fp64)."""
    pred, ref, target, mask = _inputs((F64, others, others, others))
    mixed = _call(backend, pred, ref, target, mask)
    cast = _call(backend, pred, ref.double(), target.double(), mask.double())
    assert mixed[0].dtype == F64 and mixed[2].dtype == F64
    _assert_identical(mixed, cast, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_with_cached_reference_errors_and_pair_weight(backend):
    """ref_err and pair_weight in any float dtype are read as the accumulate dtype."""
    pred, _, target, _ = _inputs((F32, F32, BF16, None))
    ref_err = torch.rand(pred.shape[0], dtype=BF16) + 0.5
    weight = torch.rand(pred.shape[0] // 2, dtype=F16) + 0.5
    mixed = fused_fdpo_loss(pred, None, target, ref_err=ref_err, pair_weight=weight, backend=backend, beta=50.0)
    cast = fused_fdpo_loss(
        pred, None, target.float(), ref_err=ref_err.float(), pair_weight=weight.float(), backend=backend, beta=50.0
    )
    assert torch.equal(mixed, cast)
