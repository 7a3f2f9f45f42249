"""Weighted policy-gradient / likelihood steps over one iteration's transitions, shared by the on-policy
baselines (REINFORCE: weights are advantages; filtered BC: weights are a keep mask) and the warm start.

Each row is one utterance: its Σ_h log π(a_h | s, a_<h) is weighted by the row's weight through a
loss function `loss_fn(logprob_sum, weights) -> (loss, metrics)` (the pure losses of reinforce.py and
filtered_bc.py).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor

from fastarcher.dist import all_reduce_max
from fastarcher.metrics import MetricBag
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.collect import sampled_lengths

LossFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


def turn_weights(episode_values: Tensor, turns_per_episode: list[int]) -> Tensor:
    """Every turn of episode e gets the episode's value (an advantage, a keep flag): (sum of turns,) in the
    order `RolloutResult.transitions` lists the turns (episode by episode)."""
    counts = torch.tensor(turns_per_episode, dtype=torch.long)
    return torch.repeat_interleave(episode_values, counts)


def policy_step(ctx, transitions: TransitionBatch, rows: Tensor, weights: Tensor, bag: MetricBag, loss_fn: LossFn,
                optimizer, clip: float, *, sampled: bool, iteration: int) -> None:
    """One guarded optimizer step on the weighted Σ log π of `rows`. `sampled`: the actions came from the
    engine, so an utterance longer than max_new_tokens was cut and closed with a stop token that was never
    sampled (close_utterance): only its first max_new_tokens tokens are scored. Demonstrations (warm
    start) are scored whole."""
    actor = ctx.actor
    mb = transitions.select(rows.to(transitions.state_ids.device)).to(actor.device).trimmed()
    w = weights[rows].to(actor.device)
    sampled_len = sampled_lengths(mb.action_len, ctx.cfg.rollout.max_new_tokens) if sampled else None
    logprob_sum, entropy = actor.logprobs(mb.state_ids, mb.state_len, mb.action_ids, mb.action_len,
                                          sampled_len=sampled_len)
    loss, metrics = loss_fn(logprob_sum, w)
    loss.backward()
    bag.add({**metrics, "actor/entropy": entropy.detach().mean()})
    bag.add({"actor/grad_norm": ctx.guard.check_and_step("actor", optimizer, max_norm=clip, iteration=iteration,
                                                         loss=loss)})


def weighted_updates(ctx, transitions: TransitionBatch, weights: Tensor, bag: MetricBag, loss_fn: LossFn, *,
                     epochs: int, iteration: int) -> None:
    """`epochs` passes over the transitions in shuffled minibatches of archer.batch_size rows (minibatch
    order from this rank's cpu_gen); every rank takes the same number of optimizer steps (the most any
    rank needs; a rank with fewer rows cycles through its own)."""
    b = ctx.cfg.archer.batch_size
    n = len(transitions)
    steps = int(all_reduce_max(torch.tensor([math.ceil(n / b)], dtype=torch.long))[0])
    for _ in range(epochs):
        order = torch.randperm(max(n, 1), generator=ctx.streams.cpu_gen)
        for step in range(steps):
            rows = order[(torch.arange(step * b, (step + 1) * b)) % max(n, 1)]
            policy_step(ctx, transitions, rows, weights, bag, loss_fn, ctx.actor.optimizer,
                        ctx.cfg.optim.actor_grad_clip, sampled=True, iteration=iteration)


def on_policy_update(ctx, batch, bag: MetricBag, weights: Tensor, loss_fn: LossFn, *, epochs: int) -> dict[str, float]:
    """The update of an on-policy algorithm: `weighted_updates` over the iteration's transitions, then the
    engine sync; returns the iteration's actor and sync seconds."""
    t0 = time.perf_counter()
    weighted_updates(ctx, batch.transitions, weights, bag, loss_fn, epochs=epochs, iteration=batch.iteration)
    sync_s = ctx.actor.sync_engine()
    return {"time/actor_s": time.perf_counter() - t0 - sync_s, "time/sync_s": sync_s}
