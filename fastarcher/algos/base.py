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
        def add_demonstrations(self, transitions: TransitionBatch) -> None: ...  # only those in config.REPLAY_ALGOS
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
    process), a log function, `make_policy()`, which builds another module of the policy's architecture on
    the training device (unsharded; its weights are whatever loading gives: copy the policy's in), and
    `shard(module, blocks)`, which FSDP2-shards a module like the policy (each block, then the root) when
    there are several processes and returns it."""

    cfg: Any  # fastarcher.config.TrainConfig
    actor: Actor
    guard: Any  # fastarcher.guards.StepGuard
    streams: RandomStreams
    info: Any  # fastarcher.dist.DistInfo
    vocab_size: int
    mesh: Any = None
    log: Callable[[str], None] = print
    make_policy: Callable[[], Any] | None = None
    shard: Callable[[Any, list], Any] = lambda module, blocks: module


@dataclass
class IterationBatch:
    """One iteration's experience on this rank: its index, the episodes (`RolloutResult`, with per-episode
    returns) and their turns as transitions (CPU tensors, Monte-Carlo returns included)."""

    iteration: int
    rollout: Any  # fastarcher.rollout.collect.RolloutResult
    transitions: TransitionBatch
    greedy: Any = None
    """For an algorithm with `greedy_baseline`: one greedy episode per distinct seed of `rollout`
    (`RolloutResult`, episodes in the order the seeds first appear)."""


class Algorithm(Protocol):
    name: str
    greedy_baseline: bool  # the loop plays a greedy episode per seed too (ReMax)
    samples_in_update: bool  # update() generates with the engine (the loop keeps its weights resident)

    def acting_engine(self, engine): ...  # what plays the episodes (the policy's engine, or a wrapper of it)

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


class AlgorithmBase:
    """Defaults of the optional parts of the interface: nothing to checkpoint, nothing to do at the start,
    no greedy baseline rollout."""

    name = ""
    greedy_baseline = False
    """True: the loop also plays one greedy episode per distinct env seed of the iteration (`batch.greedy`)."""
    samples_in_update = False
    """True: `update` generates with the engine (ArCHer's fresh actions a′), so the loop must not release the
    engine's weights after the rollout; the algorithm releases memory itself where it can."""

    def __init__(self, ctx: AlgoContext):
        self.ctx = ctx

    def parts(self) -> dict[str, Any]:
        return {}

    def start(self, resumed: bool) -> None:
        pass

    def acting_engine(self, engine):
        """The engine the loop plays episodes with (training and evaluation): the policy's own by default;
        CHAI wraps it to pick the best of several samples by its critic."""
        return engine
