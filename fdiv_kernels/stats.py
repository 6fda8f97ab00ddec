"""FDPOStats: the per-pair and per-sample statistics trainers log, all detached."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class FDPOStats:
    """Statistics of one loss call (detached; on the inputs' device; no host sync to build them).

    Per pair ``[B]``: ``logits`` z. Per sample ``[2B]``, in the rows' storage order: ``model_err`` e,
    ``ref_err`` e_ref, ``logratio`` d (after ``logratio_clip``), ``reward`` psi(d). Scalars:
    ``implicit_acc`` (mean of z > 0; ties count 1/2 unless ``implicit_acc_ties="strict"``),
    ``raw_model_loss`` (mean of e), ``raw_ref_loss`` (mean of e_ref).
    """

    logits: torch.Tensor
    model_err: torch.Tensor
    ref_err: torch.Tensor
    logratio: torch.Tensor
    reward: torch.Tensor
    implicit_acc: torch.Tensor
    raw_model_loss: torch.Tensor
    raw_ref_loss: torch.Tensor

    @classmethod
    def from_tensors(cls, logits, model_err, ref_err, logratio, reward, implicit_acc_ties: str = "half"):
        wins = (logits > 0).to(logits.dtype)
        if implicit_acc_ties == "half":
            wins = wins + 0.5 * (logits == 0).to(logits.dtype)
        return cls(
            logits=logits.detach(),
            model_err=model_err.detach(),
            ref_err=ref_err.detach(),
            logratio=logratio.detach(),
            reward=reward.detach(),
            implicit_acc=wins.mean().detach(),
            raw_model_loss=model_err.detach().mean(),
            raw_ref_loss=ref_err.detach().mean(),
        )

    @classmethod
    def from_kernel(cls, logits, sample_stats, summary):
        """From the kernels' outputs (already non-differentiable): views only, no kernel launch."""
        model_err, ref_err, logratio, reward = sample_stats.unbind(0)
        implicit_acc, raw_model_loss, raw_ref_loss = summary.unbind(0)
        return cls(logits, model_err, ref_err, logratio, reward, implicit_acc, raw_model_loss, raw_ref_loss)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
