"""PPO for multi-turn agents (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), with a token-level value
model and a choice of advantage estimator over each episode's sampled tokens (`--ppo.estimator`):

- `gae`: token-level GAE (Schulman et al. 2016) across the whole episode (observations are not steps);
- `bilevel_gae`: RAGEN's bi-level GAE (Wang et al. 2025, https://arxiv.org/abs/2504.20073): turn-level GAE
  with `high_level_gamma`, then token-level GAE inside each turn seeded with the turn's return;
- `archer`: RAGEN's hierarchical `archer` estimator (token values mixed with the turn-level return by
  `archer_alpha`), without RAGEN's double count (fastarcher/algos/estimators.py derives it).

Per iteration: score the played tokens once with the policy that played them (log π_old) and the value
model (V_old); rewards on each turn's last sampled token (−β·KL on every token with `--kl.placement
reward`); advantages and returns by the estimator, whitened over the tokens; then `ppo.epochs` passes in
minibatches of `archer.batch_size` turns, each a clipped policy step (fastarcher/algos/ppo_loss.py) and a
clipped value step. The value model (fastarcher/value_model.py) is a separate LM of the policy's
architecture with a linear head (verl's critic), its trunk started from the policy as RL starts, trained
with `optim.critic_lr`; or (`--ppo.value-model policy`, one process) a linear head on the policy's own
trunk, trained without a gradient into the policy.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from fastarcher.algos.estimators import archer_token_advantages, bilevel_gae, gae
from fastarcher.algos.kl_control import KLPolicyGradient
from fastarcher.algos.on_policy import weighted_updates
from fastarcher.algos.ppo_loss import ppo_policy_loss, value_loss
from fastarcher.algos.reinforce_pp import token_rewards
from fastarcher.algos.token_view import pack, unpack
from fastarcher.checkpoint import ModelState, OptimizerState
from fastarcher.dist import all_reduce_max
from fastarcher.reference import score_rows, score_tokens
from fastarcher.rollout.collect import sampled_lengths
from fastarcher.value_model import PolicyValueHead, TokenValueModel


def estimate(estimator: str, rewards: Tensor, values: Tensor, mask: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """(advantages, returns) over episode rows (E, T) by `ppo.estimator`."""
    if estimator == "gae":
        return gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if estimator == "bilevel_gae":
        return bilevel_gae(rewards, values, mask, cfg.gamma, cfg.lam, cfg.high_level_gamma)
    if estimator == "archer":
        return archer_token_advantages(rewards, values, mask, cfg.gamma, cfg.lam, cfg.high_level_gamma,
                                       cfg.archer_alpha)
    raise ValueError(f"ppo.estimator {estimator!r} is not one of gae, bilevel_gae, archer")


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries (unbiased variance), 0 elsewhere."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1.0)
    var = ((x - mean).square() * m).sum() / (n - 1.0).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * m


class PPO(KLPolicyGradient):
    """`--algo ppo`. Builds a token-level value model and its optimizer, and a reference policy with
    --kl.coef > 0."""

    name = "ppo"

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.cfg
        if cfg.ppo.value_model == "policy":  # a head on the policy's trunk (one process: validate)
            self.value = PolicyValueHead(ctx.actor.policy)
        else:
            value = TokenValueModel(ctx.make_policy())
            self.value = ctx.shard(value, value.blocks())
        self.value.train()
        self.value_opt = torch.optim.AdamW([p for p in self.value.parameters() if p.requires_grad],
                                           lr=cfg.optim.critic_lr, weight_decay=cfg.optim.weight_decay)

    def parts(self) -> dict:
        return {**self.kl.parts(), "value": ModelState(self.value),
                "value_opt": OptimizerState(self.value, self.value_opt, "value_opt", self.ctx.log)}

    def start(self, resumed: bool) -> None:
        super().start(resumed)
        if not resumed:
            self.value.copy_trunk_from(self.ctx.actor.policy)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.value.parameters())
        return f"value model: {params:,} params; estimator {self.ctx.cfg.ppo.estimator}"

    def _values(self, mb) -> Tensor:
        return self.value(mb.state_ids, mb.state_len, mb.action_ids, mb.action_len, pad_id=self.ctx.actor.pad_id)

    def update(self, batch, bag) -> dict[str, float]:
        ctx, cfg, p = self.ctx, self.ctx.cfg, self.ctx.cfg.ppo
        actor, transitions = ctx.actor, batch.transitions
        for group in self.value_opt.param_groups if cfg.optim.scheduled else ():
            group["lr"] = cfg.optim.critic_lr * cfg.optim.lr_multiplier(batch.iteration, cfg.iterations)
        t0 = time.perf_counter()
        turns = [len(e.turns) for e in batch.rollout.kept()]
        chunk = cfg.archer.batch_size
        old_logprob, scored = score_tokens(actor.policy, transitions, pad_id=actor.pad_id, constraint=actor.constraint,
                                           max_new_tokens=cfg.rollout.max_new_tokens, chunk=chunk, device=actor.device)
        with torch.no_grad():
            old_values = score_rows(transitions, self._values, chunk=chunk, device=actor.device) * scored
        penalty = self.kl.reward_penalties(transitions) if self.kl.in_reward else None
        rewards, mask, layout = token_rewards(transitions.reward, penalty, scored, turns)
        adv_e, ret_e = estimate(p.estimator, rewards, pack(layout, old_values), mask, p)
        advantage, returns = unpack(layout, adv_e), unpack(layout, ret_e)  # (N, A)
        if p.normalize_advantage:
            advantage = whiten(advantage, scored)
        bag.add({"critic/value_mean": (old_values.sum() / scored.sum().clamp(min=1)),
                 "critic/return_mean": (returns.sum() / scored.sum().clamp(min=1))})
        steps = weighted_updates(ctx, transitions, advantage, bag, self._policy_loss, epochs=p.epochs,
                                 iteration=batch.iteration, kl=self.kl if self.kl.in_loss else None,
                                 old_logprob=old_logprob,
                                 after_step=lambda rows: self.value_step(transitions, rows, returns, old_values, bag,
                                                                         batch.iteration),
                                 stop=self._past_target_kl if p.target_kl is not None else None)
        sync_s = actor.sync_engine()
        return {"time/actor_s": time.perf_counter() - t0 - sync_s, "time/sync_s": sync_s,
                "actor/policy_steps": float(steps), **self.kl.end_iteration(cfg.rollout.num_envs)}

    def _past_target_kl(self) -> bool:
        """The last minibatch's approx KL above ppo.target_kl on any process (one all-reduce per step)."""
        kl = all_reduce_max(self._last_kl.detach().float().reshape(1).clone())
        return bool(kl[0] > self.ctx.cfg.ppo.target_kl)

    def _policy_loss(self, tokens) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.ctx.cfg.ppo
        loss, metrics = ppo_policy_loss(tokens.logprob, tokens.old_logprob, tokens.weights, tokens.mask.float(),
                                        clip_low=p.clip_ratio, clip_high=p.clip_ratio_high, dual_clip=p.dual_clip,
                                        agg=p.loss_agg)
        self._last_kl = metrics["actor/approx_kl"]
        return loss, {**metrics, "actor/loss": loss.detach()}

    def value_step(self, transitions, rows: Tensor, returns: Tensor, old_values: Tensor, bag, iteration: int) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        mb = transitions.select(rows).to(ctx.actor.device).trimmed()
        width = mb.action_ids.shape[1]
        values = self._values(mb)
        mask = torch.arange(width, device=values.device)[None, :] < sampled_lengths(
            mb.action_len, cfg.rollout.max_new_tokens)[:, None]
        loss, metrics = value_loss(values, old_values[rows][:, :width].to(values.device),
                                   returns[rows][:, :width].to(values.device), mask.float(), clip=cfg.ppo.value_clip,
                                   agg=cfg.ppo.loss_agg)
        loss.backward()
        bag.add(metrics)
        bag.add({"critic/grad_norm": ctx.guard.check_and_step("critic", self.value_opt, max_norm=cfg.optim.critic_grad_clip,
                                                              iteration=iteration, loss=loss)})
