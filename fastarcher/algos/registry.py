"""`--algo NAME` → the algorithm class the training loop builds (fastarcher/algos/base.py)."""

from __future__ import annotations

from fastarcher.algos.archer import Archer
from fastarcher.algos.base import AlgoContext, Algorithm
from fastarcher.algos.chai import Chai
from fastarcher.algos.filtered_bc import FilteredBC
from fastarcher.algos.group import GRPO, RLOO
from fastarcher.algos.reinforce import Reinforce
from fastarcher.algos.remax import ReMax
from fastarcher.algos.ppo import PPO
from fastarcher.algos.reinforce_pp import ReinforcePP

REGISTRY = {cls.name: cls for cls in (Archer, Chai, Reinforce, GRPO, RLOO, ReinforcePP, ReMax, PPO, FilteredBC)}
"""Algorithms with an update step; `sft` is the warm start alone and builds none."""


def build_algorithm(ctx: AlgoContext) -> Algorithm | None:
    """The algorithm `ctx.cfg.algo` names, built from the context (None for `sft`)."""
    if ctx.cfg.algo == "sft":
        return None
    if ctx.cfg.algo not in REGISTRY:
        raise ValueError(f"algo {ctx.cfg.algo!r} is not one of {', '.join(sorted(REGISTRY))} or sft")
    return REGISTRY[ctx.cfg.algo](ctx)
