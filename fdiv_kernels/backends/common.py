"""What every backend shares: the op's configuration by name, its outputs, and the row/pair mapping."""

from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING, Any

import torch

from ..options import OP_FLOATS, OP_INTS

if TYPE_CHECKING:  # mypy cannot read fields from a computed list: to it, fields are any keyword, any attribute

    class _Fields(tuple):
        def __new__(cls, *args: Any, **kwargs: Any) -> Any: ...
        def __getattr__(self, name: str) -> Any: ...

else:
    _Fields = namedtuple("KernelParams", OP_FLOATS + OP_INTS)


class KernelParams(_Fields):
    """The op's configuration by name (options.OP_FLOATS / OP_INTS; ids of csrc/fdpo_math.h, as options.ids):
    beta, alpha, gamma, label_smoothing, logratio_clip (<= 0: off), ipo_margin (m = 1 / (2 tau) of ipo),
    dmpo_log_q, dmpo_log_1mq (log q and log(1 - q) of dmpo, q = 1 - dmpo_alpha), mapo_snr, mapo_timesteps (s, T
    of mapo);
    divergence, err_reduction, reduction, loss_type, interleaved (0/1), strict_ties (0/1: implicit_acc counts ties
    z == 0 as 0 instead of 1/2)."""

    __slots__ = ()

    @classmethod
    def unpack(cls, fparams, iparams) -> KernelParams:
        """From the op's packed ``(fparams, iparams)``."""
        return cls(*fparams, *iparams)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic type for inputs whose model_pred has ``dtype``: float64 stays float64, fp32/fp16/bf16
    accumulate in float32 (spec §2). The one home of this rule in Python; the C++ twin is csrc/fdpo_op.h's
    accumulate_type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_forward_outputs(model_pred: torch.Tensor, reduction: int) -> tuple[torch.Tensor, ...]:
    """The forward op's outputs, uninitialized, in the accumulate dtype: loss ([] or [B] for reduction "none"),
    logits [B], sample_stats [4, 2B], summary [3], grad_coef [2B]. The Python twin of csrc/fdpo_op.h's."""
    rows = model_pred.shape[0]
    pairs = rows // 2
    acc: dict[str, Any] = dict(dtype=accumulate_dtype(model_pred.dtype), device=model_pred.device)
    loss = torch.empty((pairs,) if reduction == 0 else (), **acc)
    return loss, torch.empty(pairs, **acc), torch.empty(4, rows, **acc), torch.empty(3, **acc), torch.empty(rows, **acc)


def pair_rows(num_pairs: int, interleaved: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the winners and of the losers, pair by pair."""
    p = torch.arange(num_pairs, device=device)
    return (2 * p, 2 * p + 1) if interleaved else (p, p + num_pairs)


def target_rows(rows: int, target_len: int, interleaved: bool, device) -> torch.Tensor:
    """For each of the 2B rows, the row of a target/mask of length 2B (itself) or B (its pair)."""
    i = torch.arange(rows, device=device)
    if target_len == rows:
        return i
    return i // 2 if interleaved else i % target_len
