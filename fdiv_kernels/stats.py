"""FDPOStats: the per-pair and per-sample statistics trainers log, all detached."""

from __future__ import annotations

import torch


def implicit_wins(logits: torch.Tensor, strict_ties: bool) -> torch.Tensor:
    """Each pair's vote in implicit_acc: 1 where z > 0, and a tie (z == 0, e.g. policy == reference) 1/2 unless
    strict. The tie rule in Python (the torch backend and the reference); implicit_win in csrc/fdpo_math.h."""
    wins = (logits > 0).to(logits.dtype)
    if not strict_ties:
        wins = wins + 0.5 * (logits == 0).to(logits.dtype)
    return wins


class FDPOStats:
    """Statistics of one loss call (detached; on the inputs' device; no host sync to build them).

    Per pair ``[B]``: ``logits`` z. Per sample ``[2B]``, in the rows' storage order: ``model_err`` e,
    ``ref_err`` e_ref, ``logratio`` d (after ``logratio_clip``), ``reward`` psi(d). Scalars:
    ``implicit_acc`` (mean of z > 0; ties count 1/2 unless ``implicit_acc_ties="strict"``),
    ``raw_model_loss`` (mean of e), ``raw_ref_loss`` (mean of e_ref).

    It holds the kernels' three outputs as they come (``logits`` [B], ``sample_stats`` [4, 2B], ``summary`` [4]:
    the three scalars, then the SDPO cross term, 0 unless the op's cross_term; ``from_tensors``: [3]);
    each statistic is a view taken when it is read, so ``return_stats=True`` costs a training step nothing it
    does not use. ``extra``: statistics of the heads that have more (heads.py: ``sdpo_lambda``, KTO's ``kl``).
    """

    __slots__ = ("logits", "sample_stats", "summary", "extra")
    NAMES = ("logits", "model_err", "ref_err", "logratio", "reward", "implicit_acc", "raw_model_loss", "raw_ref_loss")

    def __init__(self, logits: torch.Tensor, sample_stats: torch.Tensor, summary: torch.Tensor):
        self.logits = logits
        self.sample_stats = sample_stats  # rows: model_err, ref_err, logratio, reward
        self.summary = summary  # implicit_acc, raw_model_loss, raw_ref_loss (the kernels': then the cross term X)
        self.extra: dict[str, torch.Tensor] = {}

    model_err = property(lambda self: self.sample_stats[0])
    ref_err = property(lambda self: self.sample_stats[1])
    logratio = property(lambda self: self.sample_stats[2])
    reward = property(lambda self: self.sample_stats[3])
    implicit_acc = property(lambda self: self.summary[0])
    raw_model_loss = property(lambda self: self.summary[1])
    raw_ref_loss = property(lambda self: self.summary[2])

    @classmethod
    def from_kernel(cls, logits, sample_stats, summary) -> FDPOStats:
        """From the kernels' outputs (already non-differentiable): no copy, no kernel launch."""
        return cls(logits, sample_stats, summary)

    @classmethod
    def from_tensors(cls, logits, model_err, ref_err, logratio, reward, implicit_acc_ties: str = "half") -> FDPOStats:
        """Computed here from the per-sample values (the reference's path, independent of the kernels' head)."""
        wins = implicit_wins(logits, strict_ties=implicit_acc_ties == "strict")
        sample = torch.stack([model_err, ref_err, logratio, reward]).detach()
        summary = torch.stack([wins.mean(), model_err.mean(), ref_err.mean()]).detach()
        return cls(logits.detach(), sample, summary)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.NAMES}

    def __repr__(self) -> str:
        return f"FDPOStats({', '.join(f'{n}={getattr(self, n)!r}' for n in self.NAMES)})"
