"""Drop-in helpers for existing Diffusion-DPO trainers (docs/dropin.md).

- :data:`TRAINER_CONVENTIONS` / :func:`trainer_conventions`: the keyword arguments of
  :func:`~fdiv_kernels.fused_fdpo_loss` that reproduce a known trainer's loss, logits and logged statistics
  (checked by ``tests/test_trainer_parity.py``).
- :func:`fdpo_loss_from_pairs`: the loss from separate winner and loser tensors.
- :func:`trainer_logs`: the statistics under the names diffusers' DPO scripts log.
"""

from __future__ import annotations

import torch

from .loss import fused_fdpo_loss
from .stats import FDPOStats

__all__ = [
    "TRAINER_CONVENTIONS",
    "trainer_conventions",
    "fdpo_loss_from_pairs",
    "trainer_logs",
]

# Keyword arguments of fused_fdpo_loss per trainer; pass the trainer's own beta value unchanged as ``beta``.
# All of them use the halves layout (rows [winners; losers]), fused_fdpo_loss's default.
TRAINER_CONVENTIONS: dict[str, dict] = {
    # diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py:
    # inside_term = -0.5 * beta_dpo * (model_diff - ref_diff); implicit_acc counts ties 1/2.
    "diffusers_sdxl": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="half"),
    # diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5), --loss_type sigmoid:
    # -logsigmoid(beta_dpo * (ref_diff - model_diff)): no 1/2. Its --loss_type hinge: add loss_type="hinge"; ipo:
    # loss_type="ipo", beta=1, ipo_tau=tau (its logits are not scaled by beta_dpo; docs/dropin.md, "Loss types").
    "diffusers_sd15": dict(beta_convention="full", err_reduction="mean", implicit_acc_ties="half"),
    # The original Diffusion-DPO code (Wallace et al.): as SDXL, implicit_acc = (inside_term > 0).mean().
    "diffusion_dpo": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="strict"),
    # Flow-matching trainers in the SimpleTuner style (spec §7 (docs/spec.md)): 0.5 * beta, per-sample error summed
    # over the elements by default (pass err_reduction="mean" if yours averages), target = noise - latents.
    "simpletuner_flow": dict(beta_convention="half", err_reduction="sum", implicit_acc_ties="half"),
    # The same with norm_type="mean": (err * mask).mean() over every element, masked or not (with a mask that is
    # not the masked mean); without a mask the plain mean. Pass the mask as mask=.
    "simpletuner_flow_mean": dict(beta_convention="half", err_reduction="mean_all", implicit_acc_ties="half"),
    # SimpleTuner's merged Flow-DPO (PR #2709), bghira/SimpleTuner@7d475ed3faeb961b1033038193495eacacb8e844:
    # simpletuner/helpers/distillation/flow_dpo/distiller.py:88-103 (loss) and 230-255 (_per_sample_error):
    # logits = 0.5 * beta * margin; norm_type "sum" (default) is "simpletuner_flow", "mean" is "simpletuner_flow_mean"
    # and "masked_mean" (sum(err * mask) / mask.sum().clamp_min(1)) is this one: the masked mean, equal wherever a
    # sample's mask sums to 0 or to at least 1. Its mask is [B, 1, H, W], one per pair: pass it expanded to
    # [B, C, H, W].
    "simpletuner_flow_masked_mean": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="half"),
    # Diffusion-NPO, G-U-N/Diffusion-NPO@a14f1dbc42769a797fb0c0c2e63d2c6815c5350b:DPO-DPO-NPO/train_sd15.py:853-893:
    # diffusers' SD1.5 loss lines unchanged; the pairs are flipped where the batch is built (:687-689, label_0 == 1
    # instead of diffusers' label_0 == 0), so the first half of the rows is the dispreferred image. Pass the rows as
    # they come (or, from a [preferred; dispreferred] batch, swap the halves: docs/dropin.md, "Diffusion-NPO").
    "diffusion_npo_sd15": dict(beta_convention="full", err_reduction="mean", implicit_acc_ties="half"),
    # The same for its SDXL script (DPO-DPO-NPO/train_sdxl.py:1013-1046, flip at :794-796): diffusers' SDXL loss.
    "diffusion_npo_sdxl": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="half"),
    # InPO, JaydenLyh/InPO@a9cfc4de85c9cdb7008e2ea034a30e50187c9532:train.py:1032-1052: the original Diffusion-DPO
    # lines (0.5 * beta_dpo, mean over C,H,W, strict implicit_acc); its target is the inverted noise (:1014-1018),
    # one per sample ([2B]).
    "inpo": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="strict"),
    # flow_grpo's SD3 DPO, yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd:scripts/train_sd3_dpo.py:924-950:
    # target = noise - model_input ([2B]: shared noise, distinct latents), per-sample mean over all elements,
    # inside_term = -0.5 * config.train.beta * w_l_diff, implicit_acc = (inside_term > 0) (strict).
    "flow_grpo_sd3_dpo": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="strict"),
    # OneTrainer's DPO, Nerogar/OneTrainer PR #1403 (branch of BitcrushedHeart/OneTrainer; not merged, the stored
    # copy has no commit id): modules/modelSetup/BaseModelSetup.py, BaseModelSetup.calculate_dpo_loss: logp =
    # -mean over C,H,W of (pred - target)^2, logits = beta * margin (no 1/2), accuracy = (chosen_ratio >
    # rejected_ratio) (strict). Its label smoothing is label_smoothing=; its IPO objective is loss_type="ipo",
    # beta=1, ipo_tau=tau (margin not scaled by beta); its adaptive beta is a host float per step: pass it as beta.
    "onetrainer_dpo": dict(beta_convention="full", err_reduction="mean", implicit_acc_ties="strict"),
    # kohya sd-scripts PR #1427 (Diffusion-DPO and MaPO), from its author's branch
    # rockerBOO/sd-scripts@6e124dccfc5277bfc2a1f9f588530b490589ee91 (po):
    # train_network.py:910-951, --beta_dpo: scale_term = -0.5 * beta_dpo, per-sample mean (masked
    # loss: (loss * mask).mean(), i.e. add mask=..., err_reduction="mean_all"), ties count 1/2.
    "kohya_dpo": dict(beta_convention="half", err_reduction="mean", implicit_acc_ties="half"),
    # The same PR's MaPO, train_network.py:959-973, --mapo_weight: pass beta=mapo_weight. snr = 0.5 and the
    # log-odds are multiplied by T = noise_scheduler.config.num_train_timesteps (1000 for SD). No reference model:
    # call fused_fdpo_loss(model_pred, None, target, beta=mapo_weight, **trainer_conventions("kohya_mapo")).
    "kohya_mapo": dict(loss_type="mapo", err_reduction="mean", mapo_snr=0.5, mapo_timesteps=1000),
}


def trainer_conventions(name: str) -> dict:
    """A copy of ``TRAINER_CONVENTIONS[name]``.

    Usage: ``fused_fdpo_loss(model_pred, ref_pred, target, beta=args.beta_dpo, **trainer_conventions(name))``.
    """
    try:
        return dict(TRAINER_CONVENTIONS[name])
    except (KeyError, TypeError):
        raise ValueError(f"unknown trainer {name!r}; expected one of {sorted(TRAINER_CONVENTIONS)}") from None


def _check_pair(name: str, w: torch.Tensor, l: torch.Tensor) -> None:
    for side, t in ((f"{name}_w", w), (f"{name}_l", l)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{side} must be a torch.Tensor; got {type(t).__name__}")
    if w.shape != l.shape:
        raise ValueError(
            f"{name}_w has shape {tuple(w.shape)} but {name}_l has {tuple(l.shape)}; winners and losers must "
            f"have the same shape [B, ...] (pair p = ({name}_w[p], {name}_l[p]))"
        )


def fdpo_loss_from_pairs(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor | None = None,
    ref_l: torch.Tensor | None = None,
    target_w: torch.Tensor | None = None,
    target_l: torch.Tensor | None = None,
    **kwargs,
):
    """:func:`~fdiv_kernels.fused_fdpo_loss` for trainers that keep winners and losers in separate tensors.

    Args:
        model_w, model_l: policy predictions of the winners and of the losers, ``[B, *S]`` each.
        ref_w, ref_l: reference predictions ``[B, *S]`` each; leave both ``None`` and pass ``ref_err=`` (``[2B]``,
            winners first) to use cached reference errors.
        target_w: the winners' target ``[B, *S]``.
        target_l: the losers' target; ``None`` (or ``target_w`` itself) means winner and loser share the
            target (epsilon prediction with shared noise): it is then read once per pair and not copied.
        **kwargs: any other argument of ``fused_fdpo_loss`` (``beta``, ``divergence``, ``mask`` as ``[2B, *S]``
            winners first or shared ``[B, *S]``, ``return_stats``, ...). ``layout`` is fixed to ``"halves"``.

    Returns:
        What ``fused_fdpo_loss`` returns; per-sample statistics are ordered winners first, then losers.

    Cost: ``torch.cat`` copies model_w/model_l into one ``[2B, *S]`` tensor, and likewise ref_w/ref_l and
    (unless shared) the targets: up to three extra full-size tensors written and read once more, plus the
    gradient's split back into the two halves (views, no copy). A trainer that builds its batch as
    ``torch.cat([winners, losers])`` before the model forward (as diffusers' scripts do) has the halves layout
    already and should call ``fused_fdpo_loss`` directly.
    """
    if kwargs.get("layout", "halves") != "halves":
        raise ValueError(
            f"fdpo_loss_from_pairs assembles the halves layout (rows [winners; losers]); got layout="
            f"{kwargs['layout']!r}. Drop the layout argument (or call fused_fdpo_loss directly for interleaved rows)"
        )
    kwargs.pop("layout", None)
    _check_pair("model", model_w, model_l)
    if (ref_w is None) != (ref_l is None):
        raise ValueError("pass both ref_w and ref_l (reference predictions), or neither and ref_err=[2B]")
    if target_w is None:
        raise ValueError("target_w is required: the winners' denoising target [B, ...] (and target_l, unless shared)")
    model_pred = torch.cat([model_w, model_l])
    ref_pred = None
    if ref_w is not None and ref_l is not None:  # both or neither (checked above)
        _check_pair("ref", ref_w, ref_l)
        ref_pred = torch.cat([ref_w, ref_l])
    if target_l is None or target_l is target_w:
        target = target_w  # shared [B, ...]: no copy, read once per pair
    else:
        _check_pair("target", target_w, target_l)
        target = torch.cat([target_w, target_l])
    return fused_fdpo_loss(model_pred, ref_pred, target, layout="halves", **kwargs)


def trainer_logs(loss: torch.Tensor, stats: FDPOStats) -> dict[str, torch.Tensor]:
    """The scalars diffusers' DPO scripts log, under their names, detached (call ``.item()`` when logging).

    ``loss``, ``raw_model_loss`` (mean of the policy's per-sample errors), ``ref_loss`` (the reference's) and
    ``implicit_acc`` (tie rule as chosen by ``implicit_acc_ties``).
    """
    return {
        "loss": loss.detach(),
        "raw_model_loss": stats.raw_model_loss,
        "ref_loss": stats.raw_ref_loss,
        "implicit_acc": stats.implicit_acc,
    }
