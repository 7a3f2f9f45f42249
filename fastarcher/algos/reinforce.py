"""REINFORCE with a group-mean baseline (GRPO/RLOO-style advantages without clipping or KL).

A baseline subtracts, from each episode's return, the mean return of its group (episodes started from
the same prompt/seed, GRPO: Shao et al. 2024, https://arxiv.org/abs/2402.03300); with one group the
baseline is the batch mean, the plain REINFORCE-with-baseline that learned guess-the-number in the
design notes. Optionally the advantage is divided by the group's std (GRPO's normalisation).
The policy gradient is on-policy: loss = −mean_b(A_b · Σ_h log π(a_h | s, a_<h)).

The losses are pure functions (tensors in, tensors out; no `.item()`, no collectives); the algorithm
class below is what the training loop runs (fastarcher/algos/base.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastarcher.algos.kl_control import KLPolicyGradient
from fastarcher.algos.on_policy import discounted_turn_returns, on_policy_update


@torch.no_grad()
def group_advantages(
    returns: Tensor,
    group_ids: Tensor | None,
    *,
    normalize_std: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """A_b = R_b − mean_{g(b)} R, optionally divided by (std_{g(b)} R + eps), eps > 0; (B,), detached.

    returns: (B,) float. group_ids: (B,) integer labels (any values; None = one group).
    The std is the unbiased sample std (as in GRPO implementations); a group of one has std 0 and
    advantage 0. `torch.unique` on the labels is a device sync on GPU (once per update, not per row).
    """
    if normalize_std and not eps > 0:
        raise ValueError(f"eps ({eps}) must be positive when normalize_std is set (constant groups have std 0)")
    if returns.dim() != 1:
        raise ValueError(f"returns must be 1-D (B,), got shape {tuple(returns.shape)}")
    if group_ids is None:
        group_ids = torch.zeros_like(returns, dtype=torch.long)
    if group_ids.shape != returns.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} must equal returns shape {tuple(returns.shape)}")
    returns = returns.float() if not returns.is_floating_point() else returns
    labels, inverse = torch.unique(group_ids, return_inverse=True)  # inverse (B,): dense index 0..G-1
    num_groups = labels.numel()
    count = torch.zeros(num_groups, dtype=returns.dtype, device=returns.device).index_add_(
        0, inverse, torch.ones_like(returns))  # (G,)
    total = torch.zeros_like(count).index_add_(0, inverse, returns)  # (G,)
    mean = total / count  # (G,)
    advantage = returns - mean[inverse]  # (B,)
    if normalize_std:
        sq = torch.zeros_like(count).index_add_(0, inverse, advantage.pow(2))  # (G,)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # (G,) unbiased; 0 for a single-row group
        advantage = advantage / (std[inverse] + eps)
    return advantage


def policy_gradient_loss(*, logprob_sum: Tensor, advantage: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = −mean_b(A_b · Σ_h log π(a_h|·)); the advantage is a constant (detached).

    logprob_sum: (B,) differentiable. advantage: (B,).
    """
    advantage = advantage.detach().to(logprob_sum.dtype)
    pg_loss = -(advantage * logprob_sum).mean()
    metrics = {
        "actor/pg_loss": pg_loss.detach(),
        "actor/loss": pg_loss.detach(),
        "actor/advantage_mean": advantage.mean(),
        "actor/advantage_std": advantage.std(correction=0),
        "actor/logprob_mean": logprob_sum.detach().mean(),
    }
    return pg_loss, metrics


class Reinforce(KLPolicyGradient):
    """`--algo reinforce`: on-policy REINFORCE over the iteration's turns, each weighted by its episode's
    batch-mean-baselined Monte-Carlo return (optionally std-normalised), `baseline.update_epochs` passes.
    Builds nothing: no critic, no replay buffer."""

    name = "reinforce"

    def update(self, batch, bag) -> dict[str, float]:
        cfg = self.ctx.cfg
        returns = batch.transitions.mc_return
        if self.kl.in_reward:  # each turn's reward less β·Σ of its tokens' KL, then the returns again
            turns = [len(e.turns) for e in batch.rollout.kept()]
            penalty = self.kl.reward_penalties(batch.transitions).sum(-1)
            returns = discounted_turn_returns(batch.transitions.reward - penalty, turns, cfg.archer.gamma)
        advantage = group_advantages(returns, None, normalize_std=cfg.baseline.normalize_std)
        out = on_policy_update(self.ctx, batch, bag, advantage, pg_loss_for(cfg.baseline), epochs=cfg.baseline.update_epochs,
                               kl=self.kl)
        return {**out, **self.kl.end_iteration(cfg.rollout.num_envs)}


def pg_loss(tokens) -> tuple[Tensor, dict[str, Tensor]]:
    """`policy_gradient_loss` as the loss the on-policy updates take (`PolicyTokens`; weights: advantages)."""
    return policy_gradient_loss(logprob_sum=tokens.logprob_sum, advantage=tokens.weights)


def length_normalized_pg_loss(tokens) -> tuple[Tensor, dict[str, Tensor]]:
    """`policy_gradient_loss` on each utterance's mean token log-prob, 1/|o| Σ_t log π (GRPO's form)."""
    count = tokens.mask.sum(-1).clamp(min=1).to(tokens.logprob.dtype)
    return policy_gradient_loss(logprob_sum=tokens.logprob_sum / count, advantage=tokens.weights)


def pg_loss_for(baseline_cfg):
    """The utterance-level policy-gradient loss `--baseline.length-norm` selects."""
    return length_normalized_pg_loss if baseline_cfg.length_norm else pg_loss
