"""Filtered behaviour cloning: imitate the top fraction of episodes by return.

The simple offline/online baseline of the ArCHer paper ("Filtered BC", Zhou et al. 2024,
https://arxiv.org/abs/2402.19446): keep the utterances of the best `fraction` of trajectories and
maximise their log-likelihood. With every row kept this is plain supervised fine-tuning (`sft`).

The losses are pure functions (tensors in, tensors out; no `.item()`, no collectives); the algorithm
class below is what the training loop runs (fastarcher/algos/base.py).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastarcher.algos.on_policy import on_policy_update, turn_weights


@torch.no_grad()
def filter_top_fraction(returns: Tensor, fraction: float) -> Tensor:
    """Boolean mask (B,) keeping the k = ceil(fraction · B) rows with the highest returns.

    Ties are broken deterministically by position: among equal returns the earlier row wins (a stable
    descending sort), so exactly k rows are kept even when returns tie at the threshold.
    fraction must be in (0, 1]; fraction = 1 keeps everything.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"filtered_bc fraction ({fraction}) must be in (0, 1]")
    if returns.dim() != 1:
        raise ValueError(f"returns must be 1-D (B,), got shape {tuple(returns.shape)}")
    n = returns.numel()
    # round first so that e.g. 0.3 · 10 = 3.0000000000000004 keeps 3 rows, not 4
    k = min(n, math.ceil(round(fraction * n, 9)))
    order = torch.sort(returns, descending=True, stable=True).indices  # (B,) best first, earlier first on ties
    mask = torch.zeros(n, dtype=torch.bool, device=returns.device)
    mask[order[:k]] = True
    return mask


def bc_loss(*, logprob_sum: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean negative log-likelihood over kept rows: −Σ_b m_b · Σ_h log π(a_h|·) / max(Σ_b m_b, 1).

    logprob_sum: (B,) differentiable; mask: (B,) bool or 0/1. With no kept row the loss is 0 and still
    part of the graph (its gradient is zero), so every rank can call backward.
    """
    weight = mask.to(logprob_sum.dtype)
    kept = weight.sum()
    nll = -(weight * logprob_sum).sum() / kept.clamp(min=1.0)
    metrics = {
        "actor/bc_loss": nll.detach(),
        "actor/loss": nll.detach(),
        "actor/kept_fraction": kept / max(weight.numel(), 1),
        "actor/logprob_mean": (weight * logprob_sum.detach()).sum() / kept.clamp(min=1.0),
    }
    return nll, metrics


class FilteredBC:
    """`--algo filtered_bc`: behaviour cloning on every turn of this iteration's top `baseline.filter_fraction`
    episodes by return. Builds nothing: no critic, no replay buffer."""

    name = "filtered_bc"

    def __init__(self, ctx):
        self.ctx = ctx

    def parts(self) -> dict:
        return {}

    def update(self, batch, bag) -> dict[str, float]:
        kept = batch.rollout.kept()
        returns = torch.tensor([e.total_reward for e in kept], dtype=torch.float32)
        top = filter_top_fraction(returns, self.ctx.cfg.baseline.filter_fraction)
        keep = turn_weights(top.float(), [len(e.turns) for e in kept])  # every turn of a kept episode
        return on_policy_update(self.ctx, batch, bag, keep, masked_bc_loss, epochs=1)


def masked_bc_loss(logprob_sum: Tensor, keep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`bc_loss` as the (logprob_sum, weights) loss the on-policy updates take (weights: a 0/1 keep mask)."""
    return bc_loss(logprob_sum=logprob_sum, mask=keep.bool())
