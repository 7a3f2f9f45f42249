"""The policy side that every algorithm shares: sampling from the rollout engine, per-utterance log-probs
with gradients, and keeping the engine's copy of the weights current.

An algorithm gets an `Actor` and never the trainer: it samples fresh actions, scores utterances and
steps `actor.optimizer` through the guard; the loop owns environments, evaluation, logging and saving.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from fastarcher.policy import action_logprobs
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.base import ActionConstraint, SamplingParams
from fastarcher.rollout.collect import close_utterance, pad_rows, sampled_lengths
from fastarcher.rollout.weight_sync import sync_weights


class Actor:
    """`policy` (possibly FSDP2-sharded) with its `optimizer`, the rollout `engine` holding a copy of it,
    the tokenizer's pad and stop ids, the optional action constraint, and the traces of actor steps."""

    def __init__(self, policy: nn.Module, optimizer, engine, *, rollout_cfg, pad_id: int, stop_id: int,
                 constraint: ActionConstraint | None, device, traces=None, fused_head: bool = True):
        self.policy, self.optimizer, self.engine = policy, optimizer, engine
        self.rollout_cfg = rollout_cfg
        self.pad_id, self.stop_id, self.constraint, self.device = pad_id, stop_id, constraint, device
        self.traces = traces
        self.fused_head = fused_head

    @property
    def share_states(self) -> bool:
        """A group's episodes start from one prompt: score each distinct state once (not while traces hook
        the model's layers: they expect one forward per micro-batch)."""
        r = self.rollout_cfg
        return r.group_size > 1 and r.share_prompts and (self.traces is None or not self.traces.enabled)

    def sampling_params(self, greedy: bool = False) -> SamplingParams:
        r = self.rollout_cfg
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              greedy=greedy, stop_token_id=self.stop_id, constraint=self.constraint,
                              share_prompts=r.group_size > 1 and r.share_prompts)

    def sample_actions(self, states: TransitionBatch, generator, engine=None) -> tuple[Tensor, Tensor, Tensor, int]:
        """a′ ~ π(·|s) for every state of the batch, in as few engine calls as max_batch allows:
        (action ids, action lengths, sampled lengths, engine calls). An utterance cut at max_new_tokens
        is closed with a stop token that was not sampled; its sampled length leaves that token out.
        `engine`: another engine to sample with (CHAI's best-of-k), else the policy's."""
        engine = engine if engine is not None else self.engine
        ids, lens = states.state_ids.tolist(), states.state_len.tolist()
        prompts = [row[:n] for row, n in zip(ids, lens)]
        out = engine.generate(prompts, self.sampling_params(), generator)
        actions = [close_utterance(a, self.stop_id) for a in out.token_ids]
        action_ids, action_len = pad_rows(actions, self.pad_id)
        sampled_len = sampled_lengths(action_len, self.rollout_cfg.max_new_tokens)
        calls = math.ceil(len(prompts) / engine.max_batch)
        return action_ids.to(self.device), action_len.to(self.device), sampled_len.to(self.device), calls

    def logprobs(self, state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor, *, trace=None,
                 sampled_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Σ log π over the sampled tokens of each utterance (B,) and their entropy Σ_h H_h (B,)."""
        logprob_sum, token_entropy, action_mask = action_logprobs(
            self.policy, state_ids, state_len, action_ids, action_len, pad_id=self.pad_id, constraint=self.constraint,
            sampled_len=sampled_len, fused_head=self.fused_head, share_states=self.share_states)
        if trace is not None:  # a traced actor micro-batch: the entropy trace wants every token's entropy
            trace.set_token_entropy(token_entropy)
        # Utterance entropy: the sum of the per-token conditional entropies along the utterance (a
        # per-token mean would be diluted by forced tokens such as the stop token of a fixed action set).
        entropy = (token_entropy * action_mask).sum(-1)
        return logprob_sum, entropy

    def token_logprobs(self, state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor, *,
                       sampled_len: Tensor | None = None, log_distribution: bool = False) -> tuple[Tensor, ...]:
        """Per token: (log π of the sampled tokens (B, A), entropy (B, A), scored mask (B, A)) and, with
        log_distribution, the whole log π(·|s, a_<h) (B, A, V); log π is 0 off the scored tokens."""
        return action_logprobs(self.policy, state_ids, state_len, action_ids, action_len, pad_id=self.pad_id,
                               constraint=self.constraint, per_token=True, sampled_len=sampled_len,
                               log_distribution=log_distribution, fused_head=self.fused_head,
                               share_states=self.share_states)

    def sync_engine(self) -> float:
        """Copy the policy's weights into the rollout engine; returns the seconds it took."""
        return sync_weights(self.policy, self.engine, self.rollout_cfg.sync_bucket_mb << 20)["seconds"]
