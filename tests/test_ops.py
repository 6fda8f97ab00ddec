"""The torch.library ops: opcheck, torch.compile without graph breaks, autograd wiring, the module, stats."""

import pytest
import torch

import fdiv_kernels.ops  # noqa: F401  (registers fdiv_kernels::fdpo_forward / fdpo_backward)
from fdiv_kernels import FDPOLoss, FDPOStats, fdpo_loss_reference, fused_fdpo_loss
from fdiv_kernels.backends import _why_unavailable


def _cpu_backends():
    for name in ("cpu", "torch", "triton"):
        why = _why_unavailable(name, torch.device("cpu"))
        yield pytest.param(name, marks=pytest.mark.skipif(why is not None, reason=str(why)))


CPU_BACKENDS = list(_cpu_backends())


def _inputs(B=2, shape=(3, 5, 7), dtype=torch.float32, seed=0, shared_target=False):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g).to(dtype)
    ref = (pred.float() + 0.02 * torch.randn(pred.shape, generator=g)).to(dtype)
    target = torch.randn(B if shared_target else 2 * B, *shape, generator=g).to(dtype)
    return pred, ref, target


def _op_args(backend, reduction=1, mask=False, ref_err=False):
    pred, ref, target = _inputs(shared_target=True)
    rows = pred.shape[0]
    flat = lambda x: x.reshape(x.shape[0], -1).contiguous()  # noqa: E731
    m = torch.rand(rows, flat(pred).shape[1]) if mask else None
    ref_e = torch.rand(rows) if ref_err else None
    return (flat(pred).requires_grad_(), None if ref_err else flat(ref), flat(target), ref_e, m,
            torch.rand(rows // 2) + 0.5, 400.0, 2, 0.5, 1.0, 0.1, False, 0.0, reduction, False, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction, mask, ref_err", [(1, False, False), (0, True, False), (2, False, True)])
def test_opcheck_forward(backend, reduction, mask, ref_err):
    torch.library.opcheck(torch.ops.fdiv_kernels.fdpo_forward.default, _op_args(backend, reduction, mask, ref_err))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_backward(backend):
    pred, _, target = _inputs()
    flat = lambda x: x.reshape(x.shape[0], -1).contiguous()  # noqa: E731
    coef = torch.randn(pred.shape[0])
    for grad_loss in (torch.tensor(0.7), torch.rand(pred.shape[0] // 2)):
        torch.library.opcheck(torch.ops.fdiv_kernels.fdpo_backward.default,
                              (grad_loss, flat(pred), flat(target), None, coef, False, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction, mask, ref_err", [(1, False, False), (0, True, False), (2, False, True)])
def test_eager_path_matches_the_custom_op_bit_for_bit(backend, reduction, mask, ref_err):
    """Eager calls skip the custom op's dispatch (ops.fdpo_forward_eager); outputs and gradient are the op's."""
    args = _op_args(backend, reduction, mask, ref_err)
    results = []
    for forward in (fdiv_kernels.ops.fdpo_forward, fdiv_kernels.ops.fdpo_forward_eager):
        pred = args[0].detach().clone().requires_grad_()
        outputs = forward(pred, *args[1:])
        assert [o.requires_grad for o in outputs] == [True, False, False, False]
        upstream = torch.rand(outputs[0].shape, generator=torch.Generator().manual_seed(1)) + 0.5
        (grad,) = torch.autograd.grad(outputs[0], pred, grad_outputs=upstream)
        results.append((*outputs, grad))
    for op_result, eager_result in zip(*results):
        assert torch.equal(op_result, eager_result)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    pred, ref, target = _inputs(B=3, shape=(4, 6, 5), shared_target=True)

    def step(p):
        loss, stats = fused_fdpo_loss(p, ref, target, divergence="js", return_stats=True, backend=backend)
        return loss * 2.0, stats.implicit_acc

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    p_eager, p_compiled = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss_e, acc_e = step(p_eager)
    loss_c, acc_c = compiled(p_compiled)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(acc_c, acc_e)
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_flows_into_model_pred_only_through_any_view(backend):
    pred, ref, target = _inputs(B=2, shape=(4, 6, 5))
    base = pred.permute(0, 2, 3, 1).contiguous().requires_grad_()  # a non-contiguous view of the same values
    loss = fused_fdpo_loss(base.permute(0, 3, 1, 2), ref, target, divergence="hellinger", backend=backend)
    loss.backward()
    p64 = pred.double().requires_grad_()
    fdpo_loss_reference(p64, ref.double(), target.double(), divergence="hellinger").backward()
    torch.testing.assert_close(base.grad.permute(0, 3, 1, 2), p64.grad.float(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stats_are_detached_and_complete(backend):
    pred, ref, target = _inputs(B=3)
    pred.requires_grad_()
    loss, stats = fused_fdpo_loss(pred, ref, target, return_stats=True, backend=backend)
    assert isinstance(stats, FDPOStats)
    for name, value in stats.as_dict().items():
        assert not value.requires_grad, name
    assert stats.logits.shape == (3,) and stats.model_err.shape == (6,) and stats.implicit_acc.shape == ()
    assert loss.requires_grad


def test_module_is_the_functional_loss():
    pred, ref, target = _inputs()
    module = FDPOLoss(divergence="alpha", alpha=0.3, beta=1000.0, backend="torch")
    assert "divergence='alpha'" in repr(module)
    torch.testing.assert_close(
        module(pred, ref, target),
        fused_fdpo_loss(pred, ref, target, divergence="alpha", alpha=0.3, beta=1000.0, backend="torch"),
    )


def test_implicit_acc_tie_rules():
    pred, _, target = _inputs(B=4)
    ref = pred.clone()  # every logit is exactly 0: a tie everywhere
    _, half = fused_fdpo_loss(pred, ref, target, return_stats=True, backend="torch")
    _, strict = fused_fdpo_loss(pred, ref, target, return_stats=True, implicit_acc_ties="strict", backend="torch")
    assert half.implicit_acc.item() == 0.5 and strict.implicit_acc.item() == 0.0
