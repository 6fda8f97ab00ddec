"""What every backend shares: the scalar parameters of the kernel contract and the row/pair mapping."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelParams(NamedTuple):
    """Scalars of the kernel contract, in the order of fdiv_kernels::fdpo_forward's schema (docs/spec.md); ids
    match csrc/fdpo_math.h."""

    beta: float
    divergence: int
    alpha: float
    gamma: float
    label_smoothing: float
    err_reduction: int  # 0 masked mean, 1 sum, 2 mean over all elements
    logratio_clip: float  # <= 0: off
    reduction: int  # 0 none, 1 mean, 2 sum
    loss_type: int  # 0 sigmoid, 1 hinge, 2 ipo
    ipo_margin: float  # m = 1 / (2 tau) of ipo
    interleaved: bool
    strict_ties: bool = False  # implicit_acc counts ties (z == 0) as 0 instead of 1/2


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic type for inputs whose model_pred has ``dtype``: float64 stays float64, fp32/fp16/bf16
    accumulate in float32 (spec §2). The one home of this rule in Python; csrc/fdpo_op.h has the C++ twin."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
