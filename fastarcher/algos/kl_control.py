"""The KL toward a frozen reference policy, as every policy-gradient algorithm uses it (`--kl.*`).

    placement 'loss':    loss += β · mean over the minibatch's sampled tokens of k(log π, log π_ref)
    placement 'reward':  r_t ← r_t − β · k(log π_old, log π_ref) on every sampled token, before advantages

k is the estimator `kl.estimator` (fastarcher/algos/kl.py: kl = k1, abs, mse = k2, low_var_kl = k3, full =
the exact KL over the vocabulary). In the reward the per-token penalties of an episode add up (an
episode-level algorithm such as GRPO sees R − β·Σ_t k_t; REINFORCE++ sees them token by token). β is
fixed, or adapted after every iteration toward `kl.target` from the iteration's mean per-token KL over
all ranks (Ziegler et al. 2019). Logged: `kl/value` (mean per-token estimate) and `kl/coef` (β).

Owns the reference policy (a sharded checkpoint part, `ReferencePolicy`) and the controller (a run part).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarcher.algos.base import AlgorithmBase
from fastarcher.algos.kl import AdaptiveKLController, FixedKLController, kl_full, kl_penalty
from fastarcher.checkpoint import ModelState
from fastarcher.dist import all_reduce_sum
from fastarcher.model import transformer_blocks
from fastarcher.reference import ReferencePolicy, score_rows, scored_mask
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.collect import sampled_lengths


class KLControl:
    """Built by an algorithm from its `AlgoContext`; inert (no reference policy) when kl.coef is 0."""

    def __init__(self, ctx):
        self.ctx, k = ctx, ctx.cfg.kl
        self.enabled = k.coef > 0
        self.in_loss = self.enabled and k.placement == "loss"
        self.in_reward = self.enabled and k.placement == "reward"
        self.needs_distribution = k.estimator == "full"
        self.estimator = k.estimator
        self.reference = None
        self.controller = (AdaptiveKLController(k.coef, k.target, k.horizon) if k.adaptive
                           else FixedKLController(k.coef))
        if self.enabled:
            actor = ctx.actor
            model = ctx.make_policy()
            self.reference = ReferencePolicy(ctx.shard(model, transformer_blocks(model)), pad_id=actor.pad_id, constraint=actor.constraint,
                                             max_new_tokens=ctx.cfg.rollout.max_new_tokens)
        self._sum = torch.zeros((), dtype=torch.float64)  # this iteration's Σ per-token KL and token count
        self._count = torch.zeros((), dtype=torch.float64)

    @property
    def beta(self) -> float:
        return self.controller.value

    def parts(self) -> dict:
        if not self.enabled:
            return {}
        return {"reference": ModelState(self.reference.model), "kl_controller": self.controller}

    def start(self, resumed: bool) -> None:
        """A fresh run anchors the reference at the policy as RL starts; a resumed one keeps its own."""
        if self.enabled and not resumed:
            self.reference.copy_from(self.ctx.actor.policy)

    def _estimate(self, logprob: Tensor, ref_logprob: Tensor, log_dist: Tensor | None,
                  ref_log_dist: Tensor | None) -> Tensor:
        if self.estimator == "full":
            return kl_full(log_dist, ref_log_dist)
        return kl_penalty(logprob, ref_logprob, self.estimator)

    def _record(self, k: Tensor, mask: Tensor) -> Tensor:
        """Adds the scored tokens' estimates to the iteration's tally; returns their mean."""
        m = mask.to(torch.float64)
        total, count = (k.detach().double() * m).sum().cpu(), m.sum().cpu()
        self._sum += total
        self._count += count
        return (total / count.clamp(min=1)).float()

    def loss_term(self, mb: TransitionBatch, tokens, log_dist: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """β · token-mean KL of the minibatch (placement 'loss'), differentiable through the policy."""
        ref = self.reference.token_logprobs(mb, log_distribution=self.needs_distribution)
        k = self._estimate(tokens.logprob, ref[0], log_dist, ref[1] if self.needs_distribution else None)
        mask = tokens.mask.to(k.dtype)
        mean = (k * mask).sum() / mask.sum().clamp(min=1.0)
        self._record(k, tokens.mask)
        return self.beta * mean, {"actor/kl_loss": mean.detach()}

    @torch.no_grad()
    def reward_penalties(self, transitions: TransitionBatch) -> Tensor:
        """β · k_t for every sampled token of every transition, (N, A) on the CPU (0 off the sampled tokens):
        the sampling policy's log-probs against the reference's, in chunks (placement 'reward')."""
        ctx = self.ctx
        actor, full = ctx.actor, self.needs_distribution

        def estimate(mb: TransitionBatch) -> Tensor:
            sampled = sampled_lengths(mb.action_len, ctx.cfg.rollout.max_new_tokens)
            out = actor.token_logprobs(mb.state_ids, mb.state_len, mb.action_ids, mb.action_len, sampled_len=sampled,
                                       log_distribution=full)
            ref = self.reference.token_logprobs(mb, log_distribution=full)
            k = self._estimate(out[0], ref[0], out[3] if full else None, ref[1] if full else None)
            return k * out[2]

        k = score_rows(transitions, estimate, chunk=ctx.cfg.archer.batch_size, device=actor.device)
        self._record(k, scored_mask(transitions.action_len, k.shape[1], ctx.cfg.rollout.max_new_tokens))
        return self.beta * k

    def end_iteration(self, episodes: int) -> dict[str, float]:
        """Adapt β from the iteration's mean per-token KL over all ranks (`episodes`: the iteration's episodes
        over all ranks); returns the metrics to log."""
        if not self.enabled:
            return {}
        tally = all_reduce_sum(torch.stack([self._sum, self._count]))
        mean_kl = float(tally[0] / tally[1].clamp(min=1))
        self._sum.zero_()
        self._count.zero_()
        metrics = {"kl/value": mean_kl, "kl/coef": self.beta}
        self.controller.update(mean_kl, min(episodes, int(5 * self.ctx.cfg.kl.horizon)))
        return metrics


class KLPolicyGradient(AlgorithmBase):
    """Base of the policy-gradient algorithms that take `--kl.*`: owns the `KLControl` (`self.kl`), checkpoints
    its parts and anchors its reference at the start."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.kl = KLControl(ctx)

    def parts(self) -> dict:
        return self.kl.parts()

    def start(self, resumed: bool) -> None:
        self.kl.start(resumed)
