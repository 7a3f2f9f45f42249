"""Filtered behaviour cloning: imitate the top fraction of episodes by return.

The simple offline/online baseline of the ArCHer paper ("Filtered BC", Zhou et al. 2024,
https://arxiv.org/abs/2402.19446): keep the utterances of the best `fraction` of trajectories and
maximise their log-likelihood. With every row kept this is plain supervised fine-tuning (`sft`).

The losses are pure functions (tensors in, tensors out; no `.item()`, no collectives); the algorithm
class below is what the training loop runs (fastarcher/algos/base.py).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from fastarcher.algos.base import AlgorithmBase
from fastarcher.algos.elite import TopTrajectories, filter_top_fraction
from fastarcher.algos.on_policy import on_policy_update, policy_step, steps_on_every_rank, turn_weights


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


class FilteredBC(AlgorithmBase):
    """`--algo filtered_bc`: behaviour cloning on every turn of the top `baseline.filter_fraction` episodes by
    return — of all episodes played so far (`baseline.filter_over all`, the ArCHer paper's baseline; the
    kept turns live in a `TopTrajectories` store, a per-process checkpoint part) or of this iteration's
    only. Each iteration takes as many steps as one pass over its own turns would. No critic."""

    name = "filtered_bc"

    def __init__(self, ctx):
        self.ctx, b = ctx, ctx.cfg.baseline
        self.store = (TopTrajectories(b.filter_fraction, b.filter_capacity, pad_id=ctx.actor.pad_id)
                      if b.filter_over == "all" else None)

    def parts(self) -> dict:
        return {"elite": self.store} if self.store is not None else {}

    def update(self, batch, bag) -> dict[str, float]:
        kept = batch.rollout.kept()
        returns = torch.tensor([e.total_reward for e in kept], dtype=torch.float32)
        turns = [len(e.turns) for e in kept]
        if self.store is None:
            top = filter_top_fraction(returns, self.ctx.cfg.baseline.filter_fraction)
            keep = turn_weights(top.float(), turns)  # every turn of a kept episode
            return on_policy_update(self.ctx, batch, bag, keep, masked_bc_loss, epochs=1)
        return self._update_from_store(batch, bag, returns, turns)

    def _update_from_store(self, batch, bag, returns: Tensor, turns: list[int]) -> dict[str, float]:
        ctx = self.ctx
        episode_of_row = torch.repeat_interleave(torch.arange(len(turns)), torch.tensor(turns, dtype=torch.long))
        self.store.add(batch.transitions, episode_of_row, returns.double())
        b = ctx.cfg.archer.batch_size
        steps = steps_on_every_rank(len(batch.transitions), b)
        t0 = time.perf_counter()
        for k in range(steps):  # every rank steps as often as the busiest (a sharded step is a collective)
            if len(self.store):
                rows, keep = self.store.sample(b, ctx.streams.cpu_gen), torch.ones(b)
            else:  # nothing kept on this rank yet: a zero-weight step on the iteration's turns
                rows, keep = batch.transitions.select(torch.arange(b) % max(len(batch.transitions), 1)), torch.zeros(b)
            policy_step(ctx, rows, torch.arange(b), keep, bag, masked_bc_loss, ctx.actor.optimizer,
                        ctx.cfg.optim.actor_grad_clip, sampled=True, iteration=batch.iteration,
                        trace_step=batch.iteration if k == 0 else None)
        bag.add({"elite/turns": float(len(self.store)), "elite/episodes": float(self.store.num_elite_episodes),
                 "elite/threshold": float(self.store.threshold if self.store.threshold is not None else 0.0)})
        sync_s = ctx.actor.sync_engine()
        return {"time/actor_s": time.perf_counter() - t0 - sync_s, "time/sync_s": sync_s}


def masked_bc_loss(tokens) -> tuple[Tensor, dict[str, Tensor]]:
    """`bc_loss` as the loss the on-policy updates take (`PolicyTokens`; weights: a 0/1 keep mask)."""
    return bc_loss(logprob_sum=tokens.logprob_sum, mask=tokens.weights.bool())
