"""The frozen reference policy π_ref that a KL term pulls the policy toward.

It is a second copy of the policy's network (FSDP2-sharded the same way when there are several ranks),
filled with the policy's weights when RL starts (after any warm start, so a behaviour-cloned start is the
anchor, as an SFT model is in RLHF) and never trained. It is a "sharded" checkpoint part through
`ModelState`, so a resumed run keeps the anchor it started with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastarcher.dist import all_reduce_max
from fastarcher.policy import action_logprobs
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.base import ActionConstraint
from fastarcher.rollout.collect import sampled_lengths


class ReferencePolicy:
    """`model`: a module of the policy's architecture (built and sharded like it); call `copy_from(policy)`
    before the first use."""

    def __init__(self, model: nn.Module, *, pad_id: int, constraint: ActionConstraint | None, max_new_tokens: int):
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()  # no dropout: the anchor is deterministic
        self.pad_id, self.constraint, self.max_new_tokens = pad_id, constraint, max_new_tokens

    @torch.no_grad()
    def copy_from(self, policy: nn.Module) -> None:
        """Take the policy's current weights (shard by shard: the same mesh and placements, no communication)."""
        self.model.load_state_dict(policy.state_dict())

    @torch.no_grad()
    def token_logprobs(self, mb: TransitionBatch, *, log_distribution: bool = False) -> tuple[Tensor, ...]:
        """log π_ref of each sampled token of each utterance (B, A), 0 off the sampled tokens; with
        log_distribution also the whole log π_ref(·|s, a_<h) (B, A, V)."""
        out = action_logprobs(self.model, mb.state_ids, mb.state_len, mb.action_ids, mb.action_len,
                              pad_id=self.pad_id, constraint=self.constraint, per_token=True,
                              sampled_len=sampled_lengths(mb.action_len, self.max_new_tokens),
                              log_distribution=log_distribution)
        return (out[0], out[3]) if log_distribution else (out[0],)


@torch.no_grad()
def score_rows(transitions: TransitionBatch, fn, *, chunk: int, device) -> Tensor:
    """`fn(minibatch) -> (b, a)` over every transition in chunks of `chunk` rows, without gradients, gathered
    into (N, A) on the CPU (A: the transitions' action width). A sharded forward is a collective, so every
    rank runs as many chunks as the rank with the most rows (a rank with fewer re-scores its own rows and
    drops the result)."""
    n, width = len(transitions), transitions.action_ids.shape[1]
    out = torch.zeros(n, width)
    chunks = int(all_reduce_max(torch.tensor([math.ceil(n / chunk)], dtype=torch.long))[0])
    for k in range(chunks):
        rows = torch.arange(k * chunk, (k + 1) * chunk) % max(n, 1)
        live = torch.arange(k * chunk, (k + 1) * chunk) < n  # rows not wrapped around
        values = fn(transitions.select(rows).to(device).trimmed()).float().cpu()
        out[rows[live], :values.shape[1]] = values[live]
    return out


def scored_mask(action_len: Tensor, width: int, max_new_tokens: int) -> Tensor:
    """(N, width) bool: the tokens of each utterance that the policy sampled (`sampled_lengths`)."""
    return torch.arange(width)[None, :] < sampled_lengths(action_len, max_new_tokens)[:, None]


@torch.no_grad()
def score_tokens(model: nn.Module, transitions: TransitionBatch, *, pad_id: int, constraint: ActionConstraint | None,
                 max_new_tokens: int, chunk: int, device) -> tuple[Tensor, Tensor]:
    """Per-token log π of every sampled token of every transition, (N, A) on the CPU (0 elsewhere), and the
    scored-token mask (N, A): the log-probs of the sampling policy, for PPO-style ratios."""
    def logprobs(mb: TransitionBatch) -> Tensor:
        return action_logprobs(model, mb.state_ids, mb.state_len, mb.action_ids, mb.action_len, pad_id=pad_id,
                               constraint=constraint, per_token=True,
                               sampled_len=sampled_lengths(mb.action_len, max_new_tokens))[0]

    was_training = model.training
    model.eval()
    try:
        logp = score_rows(transitions, logprobs, chunk=chunk, device=device)
    finally:
        model.train(was_training)
    return logp, scored_mask(transitions.action_len, transitions.action_ids.shape[1], max_new_tokens)
