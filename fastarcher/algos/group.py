"""Group-baselined policy gradient: GRPO and RLOO over groups of episodes played from the same env seed.

With `rollout.group_size` G > 1 the loop plays G episodes from every env seed (the multi-turn analogue of
G responses per prompt). Each episode's return R_e is compared with the other episodes of its group:

- `grpo` (Shao et al. 2024, https://arxiv.org/abs/2402.03300): A_e = (R_e − mean_g R) / (std_g R + ε),
  std the unbiased sample std; `--baseline.no-group-std` drops the division (Dr. GRPO, Liu et al. 2025,
  https://arxiv.org/abs/2503.20783, which shows the std division biases toward too-easy/too-hard groups).
- `rloo` (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): A_e = R_e − mean_{j≠e in g} R_j.

Credit is trajectory-level, as verl / RAGEN do for multi-turn outcome rewards: every turn of an episode
gets its episode's advantage (`--baseline.episode-weighting`: divided among the episode's turns, so every
episode weighs the same), and the loss is −mean over turns of A · Σ_h log π(a_h | s, a_<h) (no ratio
clipping: one on-policy pass per `baseline.update_epochs`). Groups never straddle ranks (the loop deals
whole groups to each rank), so the baselines need no communication.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastarcher.algos.estimators import rloo_advantages
from fastarcher.algos.kl_control import KLPolicyGradient
from fastarcher.algos.on_policy import episode_sums, on_policy_update, turn_weights
from fastarcher.algos.reinforce import group_advantages, pg_loss_for


class _GroupPolicyGradient(KLPolicyGradient):
    name = ""

    def advantages(self, returns: Tensor, groups: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, batch, bag) -> dict[str, float]:
        kept = batch.rollout.kept()
        returns = torch.tensor([e.total_reward for e in kept], dtype=torch.float32)  # (E,)
        turns = [len(e.turns) for e in kept]
        if self.kl.in_reward:  # R_e − β·Σ over the episode's tokens of the KL estimate
            returns = returns - episode_sums(self.kl.reward_penalties(batch.transitions).sum(-1), turns)
        groups = torch.tensor([e.seed for e in kept], dtype=torch.long)  # (E,) the group is the env seed
        advantage = self.advantages(returns, groups)
        bag.add({"actor/episode_advantage_abs": advantage.abs().mean() if len(advantage) else torch.zeros(())})
        cfg = self.ctx.cfg
        weights = turn_weights(advantage, turns, per_episode=cfg.baseline.episode_weighting)
        out = on_policy_update(self.ctx, batch, bag, weights, pg_loss_for(cfg.baseline), epochs=cfg.baseline.update_epochs,
                               kl=self.kl)
        return {**out, **self.kl.end_iteration(cfg.rollout.num_envs)}


class GRPO(_GroupPolicyGradient):
    """`--algo grpo`: group-mean baseline, divided by the group's std unless `--baseline.no-group-std`."""

    name = "grpo"

    def advantages(self, returns: Tensor, groups: Tensor) -> Tensor:
        return group_advantages(returns, groups, normalize_std=self.ctx.cfg.baseline.group_std)


class RLOO(_GroupPolicyGradient):
    """`--algo rloo`: leave-one-out baseline within each group."""

    name = "rloo"

    def advantages(self, returns: Tensor, groups: Tensor) -> Tensor:
        return rloo_advantages(returns, groups)
