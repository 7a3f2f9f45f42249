"""Policy-gradient / likelihood steps over one iteration's transitions, shared by the on-policy baselines
(REINFORCE, GRPO, RLOO, REINFORCE++: weights are advantages; filtered BC: weights are a keep mask) and the
warm start.

Each row is one utterance. A step scores the sampled tokens of a minibatch of rows with gradients and hands
them to a loss function `loss_fn(tokens: PolicyTokens) -> (loss, metrics)` (the pure losses of reinforce.py
and filtered_bc.py take the per-utterance Σ_h log π; REINFORCE++ weighs every token). With a KL toward a
reference policy in the loss (`--kl.placement loss`), β · (token mean of the KL estimate) is added here,
the same for every algorithm.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastarcher.dist import all_reduce_max
from fastarcher.metrics import MetricBag
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.collect import sampled_lengths


@dataclass
class PolicyTokens:
    """One minibatch as a loss sees it."""

    logprob: Tensor
    """(B, A) log π(a_h | s, a_<h) of the scored tokens, differentiable; 0 elsewhere."""
    mask: Tensor
    """(B, A) bool: the scored tokens (those the policy sampled)."""
    entropy: Tensor
    """(B, A) the policy's entropy at each token (0 off the mask)."""
    weights: Tensor
    """(B,) one weight per utterance (an advantage, a keep flag), or (B, A) one per token."""
    old_logprob: Tensor | None = None
    """(B, A) log π_old of the scored tokens under the policy that sampled them, when the algorithm keeps it."""

    @property
    def logprob_sum(self) -> Tensor:
        """(B,) Σ_h log π over each utterance's scored tokens."""
        return (self.logprob * self.mask).sum(-1)


LossFn = Callable[[PolicyTokens], tuple[Tensor, dict[str, Tensor]]]


def turn_weights(episode_values: Tensor, turns_per_episode: list[int], *, per_episode: bool = False) -> Tensor:
    """Every turn of episode e gets the episode's value (an advantage, a keep flag): (sum of turns,) in the
    order `RolloutResult.transitions` lists the turns (episode by episode).

    per_episode: scale episode e's turns by T̄ / T_e (T_e its turns, T̄ the mean over episodes), so that each
    episode weighs the same in the loss whatever its length; the weights still sum to Σ_e value_e · T̄.
    Without it an episode counts once per turn, and when failures take more turns than successes (an agent
    that retries), the negative advantages outweigh the positive ones even where they sum to zero."""
    counts = torch.tensor(turns_per_episode, dtype=torch.long)
    if per_episode and len(turns_per_episode):
        scale = counts.float().mean() / counts.clamp(min=1).float()
        episode_values = episode_values * scale.to(episode_values.dtype)
    return torch.repeat_interleave(episode_values, counts)


def discounted_turn_returns(rewards: Tensor, turns_per_episode: list[int], gamma: float) -> Tensor:
    """G_k = r_k + γ·G_{k+1} within each episode (G after its last turn = 0), for turns listed episode by
    episode: rewards (N,) → (N,)."""
    out = torch.zeros_like(rewards)
    start = 0
    for count in turns_per_episode:
        running = torch.zeros((), dtype=rewards.dtype)
        for k in range(start + count - 1, start - 1, -1):
            running = rewards[k] + gamma * running
            out[k] = running
        start += count
    return out


def episode_sums(values: Tensor, turns_per_episode: list[int]) -> Tensor:
    """Σ over each episode's turns: (N,) → (E,)."""
    episode = torch.repeat_interleave(torch.arange(len(turns_per_episode)), torch.tensor(turns_per_episode,
                                                                                        dtype=torch.long))
    return torch.zeros(len(turns_per_episode), dtype=values.dtype).index_add_(0, episode, values)


def policy_step(ctx, transitions: TransitionBatch, rows: Tensor, weights: Tensor, bag: MetricBag, loss_fn: LossFn,
                optimizer, clip: float, *, sampled: bool, iteration: int, kl=None,
                old_logprob: Tensor | None = None, trace_step: int | None = None) -> None:
    """One guarded optimizer step on the loss of `rows`. `sampled`: the actions came from the engine, so an
    utterance longer than max_new_tokens was cut and closed with a stop token that was never sampled
    (close_utterance): only its first max_new_tokens tokens are scored. Demonstrations (warm start) are
    scored whole. `kl`: a `KLControl` whose KL term joins the loss (placement 'loss'), or None.
    `trace_step`: the index under which the actor's traces (docs/traces.md) record this step when due
    (every rank passes the same; None: never traced)."""
    actor = ctx.actor
    mb = transitions.select(rows.to(transitions.state_ids.device)).to(actor.device).trimmed()
    w = weights[rows].to(actor.device)
    width = mb.action_ids.shape[1]
    if w.dim() == 2:
        w = w[:, :width]  # per-token weights, trimmed like the actions
    old = old_logprob[rows][:, :width].to(actor.device) if old_logprob is not None else None
    sampled_len = sampled_lengths(mb.action_len, ctx.cfg.rollout.max_new_tokens) if sampled else None
    full = kl is not None and kl.needs_distribution
    traces = actor.traces if trace_step is not None and actor.traces is not None else None
    scored_len = sampled_len if sampled_len is not None else mb.action_len
    with (traces.actor_micro_batch(trace_step, mb.state_ids, mb.state_len, mb.action_ids, scored_len,
                                   advantage=row_weights(w, scored_len), q_value=mb.mc_return.float())
          if traces is not None else contextlib.nullcontext()) as trace:  # forward + backward inside
        out = actor.token_logprobs(mb.state_ids, mb.state_len, mb.action_ids, mb.action_len, sampled_len=sampled_len,
                                   log_distribution=full)
        if trace is not None:
            trace.set_token_entropy(out[1])
        tokens = PolicyTokens(logprob=out[0], mask=out[2], entropy=out[1] * out[2], weights=w, old_logprob=old)
        loss, metrics = loss_fn(tokens)
        if kl is not None:
            kl_loss, kl_metrics = kl.loss_term(mb, tokens, out[3] if full else None)
            loss = loss + kl_loss
            metrics = {**metrics, **kl_metrics, "actor/loss": loss.detach()}
        loss.backward()
    if traces is not None:
        bag.add(traces.finish_step(trace_step))  # {} unless a trace was due (a collective then)
    bag.add({**metrics, "actor/entropy": tokens.entropy.detach().sum(-1).mean()})
    bag.add({"actor/grad_norm": ctx.guard.check_and_step("actor", optimizer, max_norm=clip, iteration=iteration,
                                                         loss=loss)})


def row_weights(weights: Tensor, scored_len: Tensor) -> Tensor:
    """(B,) one number per utterance for the traces' accepted/rejected split: the weight itself, or the mean of
    per-token weights (B, A) over the scored tokens."""
    if weights.dim() == 1:
        return weights.detach().float()
    mask = torch.arange(weights.shape[1], device=weights.device) < scored_len.to(weights.device)[:, None]
    return ((weights * mask).sum(-1) / mask.sum(-1).clamp(min=1)).detach()


def steps_on_every_rank(n: int, batch: int) -> int:
    """ceil(n / batch) of the rank with the most rows: a sharded forward is a collective, so every rank
    takes that many minibatches (a rank with fewer rows cycles through its own)."""
    return int(all_reduce_max(torch.tensor([math.ceil(n / batch)], dtype=torch.long))[0])


def weighted_updates(ctx, transitions: TransitionBatch, weights: Tensor, bag: MetricBag, loss_fn: LossFn, *,
                     epochs: int, iteration: int, kl=None, old_logprob: Tensor | None = None,
                     after_step: Callable[[Tensor], None] | None = None,
                     stop: Callable[[], bool] | None = None) -> int:
    """`epochs` passes over the transitions in shuffled minibatches of archer.batch_size rows (minibatch
    order from this rank's cpu_gen); every rank takes the same number of optimizer steps (the most any
    rank needs; a rank with fewer rows cycles through its own). `after_step(rows)` runs after each policy
    step on the same rows (PPO's value step); `stop()`, asked after each step, ends the passes early (it
    must answer alike on every rank). Returns the policy steps taken."""
    b = ctx.cfg.archer.batch_size
    n = len(transitions)
    steps = steps_on_every_rank(n, b)
    for epoch in range(epochs):
        order = torch.randperm(max(n, 1), generator=ctx.streams.cpu_gen)
        for step in range(steps):
            rows = order[(torch.arange(step * b, (step + 1) * b)) % max(n, 1)]
            policy_step(ctx, transitions, rows, weights, bag, loss_fn, ctx.actor.optimizer,
                        ctx.cfg.optim.actor_grad_clip, sampled=True, iteration=iteration, kl=kl,
                        old_logprob=old_logprob, trace_step=iteration if epoch == step == 0 else None)
            if after_step is not None:
                after_step(rows)
            if stop is not None and stop():
                return epoch * steps + step + 1
    return epochs * steps


def on_policy_update(ctx, batch, bag: MetricBag, weights: Tensor, loss_fn: LossFn, *, epochs: int,
                     kl=None, old_logprob: Tensor | None = None) -> dict[str, float]:
    """The update of an on-policy algorithm: `weighted_updates` over the iteration's transitions, then the
    engine sync; returns the iteration's actor and sync seconds."""
    t0 = time.perf_counter()
    weighted_updates(ctx, batch.transitions, weights, bag, loss_fn, epochs=epochs, iteration=batch.iteration,
                     kl=kl if kl is not None and kl.in_loss else None, old_logprob=old_logprob)
    sync_s = ctx.actor.sync_engine()
    return {"time/actor_s": time.perf_counter() - t0 - sync_s, "time/sync_s": sync_s}
