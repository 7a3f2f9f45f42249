"""ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
Large Language Models", https://arxiv.org/abs/2310.10505): REINFORCE whose baseline is the return of the
greedy episode from the same env seed.

The loop plays, besides the iteration's sampled episodes, one greedy (argmax) episode per distinct seed
(`greedy_baseline = True`; `IterationBatch.greedy`). Each sampled episode e gets A_e = R_e − R_greedy(seed_e)
(`estimators.remax_advantages`), every turn of e weighted by A_e as in GRPO; with `--kl.placement reward`
R_e is penalised by β·Σ_t KL_t (the baseline, a constant per seed, stays the greedy episode's return). A
greedy episode that an env error dropped gives its seed a baseline of 0 (counted in
`count/remax_missing_baselines`). Builds nothing but the reference policy with --kl.coef > 0.
"""

from __future__ import annotations

import torch

from fastarcher.algos.estimators import remax_advantages
from fastarcher.algos.kl_control import KLPolicyGradient
from fastarcher.algos.on_policy import episode_sums, on_policy_update, turn_weights
from fastarcher.algos.reinforce import pg_loss_for


def greedy_baselines(seeds: list[int], greedy_episodes) -> tuple[torch.Tensor, int]:
    """R_greedy for each sampled episode's seed (E,), and how many seeds had no (kept) greedy episode."""
    by_seed = {e.seed: e.total_reward for e in greedy_episodes if not e.dropped and e.turns}
    missing = len({s for s in seeds if s not in by_seed})
    return torch.tensor([by_seed.get(s, 0.0) for s in seeds], dtype=torch.float32), missing


class ReMax(KLPolicyGradient):
    """`--algo remax`."""

    name = "remax"
    greedy_baseline = True

    def update(self, batch, bag) -> dict[str, float]:
        cfg = self.ctx.cfg
        kept = batch.rollout.kept()
        returns = torch.tensor([e.total_reward for e in kept], dtype=torch.float32)  # (E,)
        turns = [len(e.turns) for e in kept]
        if self.kl.in_reward:
            returns = returns - episode_sums(self.kl.reward_penalties(batch.transitions).sum(-1), turns)
        baseline, missing = greedy_baselines([e.seed for e in kept], batch.greedy.episodes)
        advantage = remax_advantages(returns, baseline)
        bag.add({"actor/greedy_return_mean": baseline.mean() if len(baseline) else torch.zeros(()),
                 "count/remax_missing_baselines": float(missing)})
        weights = turn_weights(advantage, turns, per_episode=cfg.baseline.episode_weighting)
        out = on_policy_update(self.ctx, batch, bag, weights, pg_loss_for(cfg.baseline),
                               epochs=cfg.baseline.update_epochs, kl=self.kl)
        return {**out, **self.kl.end_iteration(cfg.rollout.num_envs)}
