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
def score_tokens(model: nn.Module, transitions: TransitionBatch, *, pad_id: int, constraint: ActionConstraint | None,
                 max_new_tokens: int, chunk: int, device) -> tuple[Tensor, Tensor]:
    """Per-token log π of every sampled token of every transition, (N, A) on the CPU, in chunks of `chunk`
    rows without gradients, and the scored-token mask (N, A) — for KL penalties in the reward and for the
    log-probs of the sampling policy."""
    n, width = len(transitions), transitions.action_ids.shape[1]
    logp = torch.zeros(n, width)
    mask = torch.zeros(n, width, dtype=torch.bool)
    # a sharded forward is a collective: every rank runs as many chunks as the rank with the most rows
    # (a rank with fewer re-scores its own rows and drops the result)
    chunks = int(all_reduce_max(torch.tensor([math.ceil(n / chunk)], dtype=torch.long))[0])
    was_training = model.training
    model.eval()
    try:
        for k in range(chunks):
            rows = torch.arange(k * chunk, (k + 1) * chunk) % max(n, 1)
            mb = transitions.select(rows).to(device).trimmed()
            lp, _, scored = action_logprobs(model, mb.state_ids, mb.state_len, mb.action_ids, mb.action_len,
                                            pad_id=pad_id, constraint=constraint, per_token=True,
                                            sampled_len=sampled_lengths(mb.action_len, max_new_tokens))
            live = torch.arange(k * chunk, (k + 1) * chunk) < n
            a = lp.shape[1]
            logp[rows[live], :a] = lp.float().cpu()[live]
            mask[rows[live], :a] = scored.cpu()[live]
    finally:
        model.train(was_training)
    return logp, mask
