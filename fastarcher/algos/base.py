"""The interface between the training loop and an algorithm.

The loop (fastarcher/trainer.py) plays the iteration's episodes with the current policy, then calls
`algorithm.update(batch, bag)` once; everything an algorithm learns from lives in its own module and
is built by it: ArCHer builds its critic, target critic and replay buffer, the on-policy baselines build
nothing. What an algorithm may use of the run comes in an `AlgoContext` (never the trainer itself), and
what it must save comes back from `parts()`, which the loop hands to the checkpointer with its own.

    class MyAlgorithm:
        name = "my_algo"
        def __init__(self, ctx: AlgoContext): ...
        def parts(self) -> dict[str, Stateful]: ...                  # checkpoint parts it owns
        def start(self, resumed: bool) -> None: ...                  # once, before the first iteration
        def update(self, batch: IterationBatch, bag: MetricBag) -> dict[str, float]: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from fastarcher.actor import Actor
from fastarcher.metrics import MetricBag
from fastarcher.random_streams import RandomStreams
from fastarcher.replay import TransitionBatch


@dataclass
class AlgoContext:
    """What an algorithm gets from the run: the config, the policy side, the step guard, this rank's
    random streams, the rank layout, the tokenizer's vocabulary size, the device mesh (None on one
    process), a log function, and `make_policy()`, which builds another module of the policy's architecture,
    placed and sharded like the policy (for a reference policy; its weights are whatever loading gives)."""

    cfg: Any  # fastarcher.config.TrainConfig
    actor: Actor
    guard: Any  # fastarcher.guards.StepGuard
    streams: RandomStreams
    info: Any  # fastarcher.dist.DistInfo
    vocab_size: int
    mesh: Any = None
    log: Callable[[str], None] = print
    make_policy: Callable[[], Any] | None = None


@dataclass
class IterationBatch:
    """One iteration's experience on this rank: its index, the episodes (`RolloutResult`, with per-episode
    returns) and their turns as transitions (CPU tensors, Monte-Carlo returns included)."""

    iteration: int
    rollout: Any  # fastarcher.rollout.collect.RolloutResult
    transitions: TransitionBatch


class Algorithm(Protocol):
    name: str

    def parts(self) -> dict[str, Any]:
        """Checkpoint parts this algorithm owns (fastarcher/checkpoint/parts.py), by name."""
        ...

    def start(self, resumed: bool) -> None:
        """Called once before the first iteration, after the warm start of a fresh run or after a restore
        (`resumed`): e.g. anchor a reference policy at the policy RL starts from."""
        ...

    def update(self, batch: IterationBatch, bag: MetricBag) -> dict[str, float]:
        """Learn from the iteration's experience; per-step metrics go into `bag`, and the returned dict
        holds per-iteration ones (`time/critic_s`, `time/actor_s`, `time/sync_s`, ...)."""
        ...
