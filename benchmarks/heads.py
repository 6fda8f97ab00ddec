"""Providers for the preference heads of fdiv_kernels/heads.py (issue 23): MaPO, Diffusion-SDPO and Diffusion-KTO,
each as its authors' training script computes it (eager), torch.compile of that function, and the fused passes.

Each provider builds ``loss_fn(Inputs) -> scalar loss`` like benchmarks/providers.py, on the same inputs
(shapes.make_inputs). The eager functions below are written here from the authors' formulas (cited per function);
they keep the authors' dtype handling (MaPO and KTO cast to fp32 before the MSE; SDPO's script does not cast).

- ``mapo-*``: MaPO, reference-free, beta 0.1, snr 0.5, T = 1000 (fused: ``loss_type="mapo"``).
- ``sdpo-*``: Diffusion-DPO (beta 5000) with the winner-preserving loser scale, mu 0.9 (fused: ``sdpo_mu=0.9``).
- ``dpo-*``: plain Diffusion-DPO (providers.py's eager, compile-diffusers and fdiv-cpu, beta 5000), measured in
  the same run for context: the fused kernels' in-register head, against which the composed heads' cost shows.
- ``kto-*``: Diffusion-KTO (``--halo sigmoid``, beta_dpo 5000, lambda_D = lambda_U = 1), rows alternately desirable
  and undesirable (fused: ``fused_kto_loss(..., beta_convention="full")``, the authors' scale).

Compiled providers use ``torch.compile(dynamic=False)`` in the default mode, as compile-diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, fused_kto_loss, kto_loss_reference

from .providers import PROVIDERS
from .shapes import Inputs

MAPO_BETA = 0.1
MAPO_SNR = 0.5
MAPO_T = 1000
SDPO_BETA = 5000.0
SDPO_MU = 0.9
KTO_BETA = 5000.0
HEADS = ("dpo", "mapo", "sdpo", "kto")
SDPO_COMPILE_NOTE = (
    "torch.compile of the authors' whole function (torch 2.14, default mode) fails at the first call: dynamo breaks "
    "the graph at .requires_grad_(True), the chunk of the detached copy runs in a compiled graph that does not "
    "record autograd, and torch.autograd.grad raises 'The differentiated Tensor at index 0 appears to not have been "
    "used in the graph'. fullgraph=True refuses it (torch.autograd.grad with trace_autograd_ops=False), and "
    "with torch._dynamo.config.trace_autograd_ops = True it refuses the intermediate that had requires_grad_() "
    "called on it. sdpo-compile therefore compiles the loss part only "
    "(sdpo_dpo_head) and computes lambda eager."
)


# ---------------------------------------------------------------------------------------------------------------
# The authors' formulas, eager.
# ---------------------------------------------------------------------------------------------------------------


def mapo_authors_loss(model_pred, target, snr: float = MAPO_SNR, timesteps: int = MAPO_T, beta: float = MAPO_BETA):
    """MaPO as mapo-t2i/mapo@374b3d3:utils.py:286-301 (compute_loss) writes it: fp32 per-sample MSE, winners and
    losers by ``chunk(2)``, ``log_odds = s e_w / (exp(s e_w) - 1) - s e_l / (exp(s e_l) - 1)``, ``ratio =
    logsigmoid(T log_odds)``, loss = mean(e_w) - beta mean(ratio)."""
    errors = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    errors = errors.mean(dim=list(range(1, errors.ndim)))
    e_w, e_l = errors.chunk(2)
    log_odds = (snr * e_w) / (torch.exp(snr * e_w) - 1) - (snr * e_l) / (torch.exp(snr * e_l) - 1)
    ratio = F.logsigmoid(log_odds * timesteps)
    return e_w.mean() - (beta * ratio).mean()


def sdpo_authors_lambda(pred, target, mu: float = SDPO_MU, eps: float = 1e-9, max_lambda: float = 1.0):
    """The loser scale of AIDC-AI/Diffusion-SDPO@84fb241:train.py:84-124 (get_adaptive_lose_l_scale): the gradients
    g_w, g_l of the batch-mean squared errors of the winners and of the losers in the prediction, by
    ``torch.autograd.grad`` on a detached copy; lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w + eps), 0, 1) where
    g_l . g_w > 0, else 1; detached, in the prediction's dtype."""
    pred_w, pred_l = pred.detach().requires_grad_(True).chunk(2, dim=0)
    tgt_w, tgt_l = target.detach().chunk(2, dim=0)
    err_w = ((pred_w - tgt_w) ** 2).mean()
    err_l = ((pred_l - tgt_l) ** 2).mean()
    (g_w,) = torch.autograd.grad(err_w, pred_w)
    (g_l,) = torch.autograd.grad(err_l, pred_l)
    num = g_w.flatten().pow(2).sum()
    den = (g_l.flatten() * g_w.flatten()).sum()
    cap = (1.0 - mu) * num / (den + eps)
    lam = torch.where(den > 0, cap, torch.tensor(max_lambda, device=pred.device, dtype=pred.dtype))
    return lam.clamp(min=0.0, max=max_lambda).detach().to(dtype=pred.dtype)


def sdpo_dpo_head(model_pred, ref_pred, target, lam, beta: float = SDPO_BETA):
    """The Diffusion-DPO loss with the loser's error scaled in the gradient only, as AIDC-AI/Diffusion-SDPO@84fb241:
    train.py:1186-1209 writes it: per-sample ``(pred - target).pow(2).mean(dims)`` (no cast), ``e_l.detach() +
    lambda (e_l - e_l.detach())``, the reference's errors under no_grad, ``-logsigmoid(-beta/2 (model_diff -
    ref_diff)).mean()``."""
    dims = list(range(1, model_pred.ndim))
    errors = (model_pred - target).pow(2).mean(dim=dims)
    e_w, e_l = errors.chunk(2)
    e_l_scaled = e_l.detach() + lam * (e_l - e_l.detach())
    model_diff = e_w - e_l_scaled
    with torch.no_grad():
        ref_errors = (ref_pred - target).pow(2).mean(dim=dims)
        ref_w, ref_l = ref_errors.chunk(2)
        ref_diff = ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean()


def sdpo_authors_loss(model_pred, ref_pred, target, mu: float = SDPO_MU, beta: float = SDPO_BETA):
    return sdpo_dpo_head(model_pred, ref_pred, target, sdpo_authors_lambda(model_pred, target, mu), beta)


def kto_authors_loss(model_pred, ref_pred, target, labels, beta: float = KTO_BETA, lambda_d=1.0, lambda_u=1.0):
    """Diffusion-KTO as jacklishufan/diffusion-kto@226bbd0:train_kto_sd_v1.5.py:1451-1483 writes it (``--loss kto
    --halo sigmoid``): fp32 per-sample MSE for model and reference (reference under no_grad), ``g = -e - (-e_ref)``,
    ``kl = clamp(mean(g), min=0)`` detached (``accelerator.reduce`` is the identity on one process), ``g - kl``,
    ``h = sigmoid((2 y - 1) beta g)``, ``w_y (1 - h)`` averaged; ``labels`` 0/1 per row."""
    dims = list(range(1, model_pred.ndim))
    errors = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=dims)
    with torch.no_grad():
        ref_errors = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=dims)
    g_term = -errors - (-ref_errors)
    kl = g_term.mean().detach().clamp(min=0).detach()
    g_term = g_term - kl
    sign = 2 * labels - 1
    desirable = labels == 1
    h = torch.sigmoid(sign * beta * g_term)
    w_y = lambda_d * desirable + lambda_u * ~desirable
    return (w_y * (1 - h)).mean()


def kto_labels(rows: int, device) -> torch.Tensor:
    """Rows alternately desirable (1) and undesirable (0), int64 as a dataset's label column."""
    return (torch.arange(rows, device=device) % 2 == 0).long()


# ---------------------------------------------------------------------------------------------------------------
# Providers.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadProvider:
    name: str  # "<head>-eager", "<head>-compile", "<head>-fdiv-cpu"
    head: str
    impl: str  # "eager", "compile" or "fdiv"
    backend: str | None = None

    @property
    def compiled(self) -> bool:
        return self.impl == "compile"

    def build(self) -> Callable[[Inputs], torch.Tensor]:
        """A fresh callable; a compiled one compiles on its first call."""
        head, impl, backend = self.head, self.impl, self.backend
        if head == "dpo":
            return PROVIDERS[{"eager": "eager", "compile": "compile-diffusers", "fdiv": "fdiv-cpu"}[impl]].build()
        if head == "mapo":
            if impl == "fdiv":
                return lambda x: fused_fdpo_loss(
                    x.model_pred,
                    None,
                    x.target,
                    loss_type="mapo",
                    beta=MAPO_BETA,
                    mapo_snr=MAPO_SNR,
                    mapo_timesteps=MAPO_T,
                    backend=backend,
                )
            mapo = torch.compile(mapo_authors_loss, dynamic=False) if impl == "compile" else mapo_authors_loss
            return lambda x: mapo(x.model_pred, x.target)
        if head == "sdpo":
            if impl == "fdiv":
                return lambda x: fused_fdpo_loss(
                    x.model_pred, x.ref_pred, x.target, beta=SDPO_BETA, sdpo_mu=SDPO_MU, backend=backend
                )
            if impl == "eager":
                return lambda x: sdpo_authors_loss(x.model_pred, x.ref_pred, x.target)
            # torch.compile of the whole function fails at its first call (SDPO_COMPILE_NOTE): the lambda runs
            # eager and the DPO head with the scaled loser is compiled, lambda passed in as a tensor.
            head_fn = torch.compile(sdpo_dpo_head, dynamic=False)
            return lambda x: head_fn(
                x.model_pred, x.ref_pred, x.target, sdpo_authors_lambda(x.model_pred, x.target, SDPO_MU)
            )
        if impl == "fdiv":
            return lambda x: fused_kto_loss(
                x.model_pred,
                x.ref_pred,
                x.target,
                labels=kto_labels(x.model_pred.shape[0], x.model_pred.device).bool(),
                beta=KTO_BETA,
                beta_convention="full",
                backend=backend,
            )
        kto = torch.compile(kto_authors_loss, dynamic=False) if impl == "compile" else kto_authors_loss
        return lambda x: kto(x.model_pred, x.ref_pred, x.target, kto_labels(x.model_pred.shape[0], x.model_pred.device))


HEAD_PROVIDERS = {
    p.name: p
    for head in HEADS
    for p in (
        HeadProvider(f"{head}-eager", head, "eager"),
        HeadProvider(f"{head}-compile", head, "compile"),
        HeadProvider(f"{head}-fdiv-cpu", head, "fdiv", "cpu"),
    )
}


def reference_loss_f64(head: str, x: Inputs) -> float:
    """The head's value in float64 by fdiv_kernels.reference (written independently of the kernels), on the
    same inputs: what each provider's loss is compared with (``loss_rel_diff_vs_f64``)."""
    pred, ref, tgt = (t.detach().double() for t in (x.model_pred, x.ref_pred, x.target))
    if head == "mapo":
        loss = fdpo_loss_reference(pred, None, tgt, loss_type="mapo", beta=MAPO_BETA, mapo_snr=MAPO_SNR)
    elif head == "kto":
        labels = kto_labels(pred.shape[0], pred.device).bool()
        loss = kto_loss_reference(pred, ref, tgt, labels=labels, beta=KTO_BETA, beta_convention="full")
    else:  # dpo; sdpo's value is DPO's (lambda scales the loser's gradient only)
        loss = fdpo_loss_reference(pred, ref, tgt, beta=SDPO_BETA)
    return float(loss)
