"""Training algorithms: pure loss and advantage functions and the class the loop runs, one module each;
`algos/registry.py` maps `--algo` to the class, `algos/base.py` has the interface (docs/algorithms.md).

- `archer`: ArCHer (Zhou et al. 2024) — off-policy utterance-level double critic (Q1, Q2, V1, V2) with
  target networks trained from the replay buffer, and a token-level policy gradient with advantage
  min(Q)(s, a′) − min(V)(s) on freshly sampled actions; optional token-level baseline (`algos/archer.py`).
- `chai`: ArCHer's critic choosing the best of k utterances of a frozen policy (`algos/chai.py`).
- `reinforce`: on-policy REINFORCE with a batch-mean baseline, optional std normalisation
  (`algos/reinforce.py`).
- `grpo`, `rloo`: group-baselined policy gradient over `rollout.group_size` episodes per env seed
  (`algos/group.py`); `remax`: greedy-episode baseline (`algos/remax.py`).
- `reinforce_pp`: token-level returns whitened over the batch, KL in the reward, clipped ratio
  (`algos/reinforce_pp.py`).
- `ppo`: clipped PPO with a token value model and GAE / bi-level GAE / RAGEN's archer estimator
  (`algos/ppo.py`).
- `filtered_bc`: behaviour cloning on the top fraction of all episodes so far (`algos/filtered_bc.py`).
- `sft`: supervised warm start on demonstrations; the BC loss with every row kept
  (`filtered_bc.bc_loss` with an all-true mask).

Shared pieces: the KL toward a reference policy (`algos/kl_control.py`, `algos/kl.py`), pure estimators
(`algos/estimators.py`), PPO losses (`algos/ppo_loss.py`), turn ⇄ episode token rows (`algos/token_view.py`),
the on-policy step (`algos/on_policy.py`).
"""

ALGORITHMS: tuple[str, ...] = ("archer", "chai", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo", "filtered_bc", "sft")
"""Names accepted by `--algo`."""
