"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
https://arxiv.org/abs/2501.03262; verl `reinforce_plus_plus`): no critic, no groups; a token-level return
whitened over the whole batch, the KL to the reference policy in the reward, PPO's clipped ratio.

Per episode, its turns' sampled tokens in order (observations are not steps; fastarcher/algos/token_view.py):

    r_t = [t is the last token of turn k] · R_k − β · KL_t            (KL_t: --kl.estimator, in the reward)
    G_t = r_t + γ_tok · G_{next(t)}                                     (γ_tok = --baseline.token-gamma)
    A_t = (G_t − mean G) / std G        over every sampled token of the iteration on this rank
    loss = token-mean over the minibatch of max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),  ρ_t = π/π_old

π_old is the policy that played the iteration (its log-probs are scored once, before the first step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarcher.algos.estimators import reinforce_pp_advantages
from fastarcher.algos.kl_control import KLPolicyGradient
from fastarcher.algos.on_policy import on_policy_update
from fastarcher.algos.ppo_loss import ppo_policy_loss
from fastarcher.algos.token_view import episode_layout, pack, turn_end_rewards, unpack
from fastarcher.reference import score_tokens


def token_rewards(turn_rewards: Tensor, penalty: Tensor | None, scored: Tensor,
                  turns_per_episode: list[int]) -> tuple[Tensor, Tensor, object]:
    """Episode-row token rewards (E, T): each turn's reward on its last sampled token, less the per-token
    penalty (N, A) when given; with the episode mask (E, T) and the layout to map back to turn rows."""
    layout = episode_layout(scored.sum(-1), scored.shape[1], turns_per_episode)
    rewards = turn_end_rewards(layout, turn_rewards)
    if penalty is not None:
        rewards = rewards - pack(layout, penalty * scored)
    return rewards, layout.mask, layout


class ReinforcePP(KLPolicyGradient):
    """`--algo reinforce_pp`. Builds a reference policy only with --kl.coef > 0 (the KL then goes in the
    reward: --kl.placement reward)."""

    name = "reinforce_pp"

    def update(self, batch, bag) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        actor, transitions = ctx.actor, batch.transitions
        turns = [len(e.turns) for e in batch.rollout.kept()]
        old_logprob, scored = score_tokens(actor.policy, transitions, pad_id=actor.pad_id, constraint=actor.constraint,
                                           max_new_tokens=cfg.rollout.max_new_tokens, chunk=cfg.archer.batch_size,
                                           device=actor.device)
        penalty = self.kl.reward_penalties(transitions) if self.kl.in_reward else None
        rewards, mask, layout = token_rewards(transitions.reward, penalty, scored, turns)
        advantage = unpack(layout, reinforce_pp_advantages(rewards, mask, cfg.baseline.token_gamma))  # (N, A)
        bag.add({"actor/token_advantage_abs": (advantage.abs() * scored).sum() / scored.sum().clamp(min=1)})
        loss_fn = _clipped_loss(cfg.baseline.clip_ratio)
        out = on_policy_update(ctx, batch, bag, advantage, loss_fn, epochs=cfg.baseline.update_epochs, kl=self.kl,
                               old_logprob=old_logprob)
        return {**out, **self.kl.end_iteration(cfg.rollout.num_envs)}


def _clipped_loss(clip: float):
    def loss_fn(tokens):
        loss, metrics = ppo_policy_loss(tokens.logprob, tokens.old_logprob, tokens.weights, tokens.mask.float(),
                                        clip_low=clip)
        return loss, {**metrics, "actor/loss": loss.detach()}
    return loss_fn
