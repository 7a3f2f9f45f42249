"""Training algorithms: pure loss and advantage functions and the class the loop runs, one module each;
`algos/registry.py` maps `--algo` to the class, `algos/base.py` has the interface (docs/algorithms.md).

- `archer`: ArCHer (Zhou et al. 2024) — off-policy utterance-level double critic (Q1, Q2, V1, V2) with
  target networks trained from the replay buffer, and a token-level policy gradient with advantage
  min(Q)(s, a′) − min(V)(s) on freshly sampled actions (`algos/archer.py`).
- `reinforce`: on-policy REINFORCE with a group-mean (or batch-mean) baseline, optional GRPO std
  normalisation (`algos/reinforce.py`).
- `grpo`, `rloo`: group-baselined policy gradient over `rollout.group_size` episodes per env seed
  (`algos/group.py`).
- `filtered_bc`: behaviour cloning on the top fraction of episodes by return (`algos/filtered_bc.py`).
- `sft`: supervised warm start on demonstrations; the BC loss with every row kept
  (`filtered_bc.bc_loss` with an all-true mask).
"""

ALGORITHMS: tuple[str, ...] = ("archer", "chai", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo", "filtered_bc", "sft")
"""Names accepted by `--algo`."""
