"""Step many environments of one config in lockstep, with per-episode statistics.

    runner = BatchedEnvRunner(EnvConfig(name="frozenlake"), num_envs=64)
    prompts = runner.reset(seeds=list(range(64)))
    while runner.live_indices():
        actions = {i: policy(i) for i in runner.live_indices()}
        results = runner.step(actions)               # one StepResult per stepped env
    stats = runner.summary()                         # return/success/length/invalid over finished episodes

Plain Python in one thread: the envs are cheap next to the model, so no workers. An env whose
`reset` or `step` raises does not stop the batch: the error is logged (env name, seed, episode
index), the episode is marked `dropped`, left out of the statistics, and its slot stops being live.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

from fastarcher.envs import EnvConfig, make_env

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one env returned for one step."""

    index: int
    """Slot of the env in the runner (0..num_envs-1)."""
    obs: str
    """Next observation ("" when the episode was dropped)."""
    reward: float
    """Reward of this step (0.0 when dropped)."""
    done: bool
    """Whether the episode ended with this step (always true when dropped)."""
    info: dict
    """The env's info dict (invalid, success, ...); holds `dropped` and `error` when dropped."""
    dropped: bool = False
    """True when the env raised; discard this episode's transitions."""


@dataclass
class EpisodeStats:
    """Running statistics of the episode in one slot."""

    index: int
    """Slot of the env in the runner."""
    seed: int
    """Seed the episode was reset with."""
    episode: int
    """Runner-wide episode counter (0, 1, 2, ... over all resets of all slots)."""
    episode_return: float = 0.0
    """Sum of rewards so far."""
    length: int = 0
    """Steps taken so far."""
    success: bool = False
    """Whether a step reported success."""
    invalid_count: int = 0
    """Steps whose action was invalid."""
    done: bool = False
    """Whether the episode has ended (finished or dropped)."""
    dropped: bool = False
    """Whether the env raised; dropped episodes are excluded from `summary()`."""
    error: str = ""
    """repr of the exception when dropped."""


@dataclass
class BatchedEnvRunner:
    """`num_envs` envs built from one `EnvConfig`, reset with a list of seeds and stepped together."""

    cfg: EnvConfig
    num_envs: int
    split: str = "train"
    """'train' or 'eval': envs with a `use_split` method (datasets) draw from that split's records."""
    envs: list = field(init=False)
    stats: list[EpisodeStats] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_envs, bool) or not isinstance(self.num_envs, int) or self.num_envs <= 0:
            raise ValueError(f"num_envs ({self.num_envs!r}) must be a positive integer")
        self.envs = [make_env(self.cfg) for _ in range(self.num_envs)]
        for env in self.envs:
            if hasattr(env, "use_split"):
                env.use_split(self.split)
        self.stats = []
        self._episode_counter = 0

    # a per-rank checkpoint part: the episode numbering (in dropped-episode messages) goes on after a resume
    checkpoint_scope = "rank"

    def state_dict(self) -> dict:
        return {"episode_counter": self._episode_counter}

    def load_state_dict(self, state: dict) -> None:
        count = state["episode_counter"]
        if type(count) is not int or count < 0:
            raise ValueError(f"episode_counter must be a non-negative integer, got {count!r}")
        self._episode_counter = count

    @property
    def name(self) -> str:
        """Name of the environment."""
        return self.cfg.name

    @property
    def max_turns(self) -> int:
        """Turn limit of every episode."""
        return self.envs[0].max_turns

    def action_choices(self) -> list[str]:
        """The fixed valid actions of this env config (same for every slot)."""
        return self.envs[0].action_choices()

    def reset(self, seeds: list[int]) -> list[str]:
        """Start one episode per slot; returns the prompts ("" for a slot whose reset raised)."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset got {len(seeds)} seeds for num_envs ({self.num_envs})")
        self.stats = []
        prompts = []
        for index, (env, seed) in enumerate(zip(self.envs, seeds)):
            stats = EpisodeStats(index=index, seed=int(seed), episode=self._episode_counter)
            self._episode_counter += 1
            self.stats.append(stats)
            try:
                prompts.append(env.reset(int(seed)))
            except Exception as error:  # noqa: BLE001 - a broken env must not stop the batch
                self._drop(stats, "reset", error)
                prompts.append("")
        return prompts

    def live_indices(self) -> list[int]:
        """Slots whose episode is running (reset, not done, not dropped), ascending."""
        return [s.index for s in self.stats if not s.done]

    def step(self, actions: dict[int, str] | list[str]) -> list[StepResult]:
        """Step the given slots: a dict {slot: action} (any subset of the live slots) or a list
        aligned with `live_indices()`. Returns one StepResult per stepped slot, ascending by slot."""
        live = self.live_indices()
        if isinstance(actions, dict):
            not_live = sorted(set(actions) - set(live))
            if not_live:
                raise ValueError(f"actions given for slots {not_live} that are not live (live: {live})")
            items = sorted(actions.items())
        else:
            if len(actions) != len(live):
                raise ValueError(f"got {len(actions)} actions for {len(live)} live envs; align with live_indices()")
            items = list(zip(live, actions))
        results = []
        for index, action in items:
            stats = self.stats[index]
            try:
                obs, reward, done, info = self.envs[index].step(action)
            except Exception as error:  # noqa: BLE001 - a broken env must not stop the batch
                self._drop(stats, "step", error)
                info = {"invalid": False, "success": False, "dropped": True, "error": stats.error}
                results.append(StepResult(index, "", 0.0, True, info, dropped=True))
                continue
            stats.episode_return += reward
            stats.length += 1
            stats.invalid_count += int(bool(info.get("invalid", False)))
            stats.success = stats.success or bool(info.get("success", False))
            stats.done = bool(done)
            results.append(StepResult(index, obs, reward, bool(done), info))
        return results

    def oracle_actions(self) -> list[str]:
        """The oracle action of every live slot, aligned with `live_indices()`."""
        return [self.envs[i].oracle_action() for i in self.live_indices()]

    def random_actions(self, rng: random.Random) -> list[str]:
        """A uniformly random valid action for every live slot, aligned with `live_indices()`."""
        return [self.envs[i].random_valid_action(rng) for i in self.live_indices()]

    def finished_episodes(self) -> list[EpisodeStats]:
        """Episodes of the current batch that ended normally (not dropped)."""
        return [s for s in self.stats if s.done and not s.dropped]

    def summary(self) -> dict[str, float]:
        """Means over finished, non-dropped episodes of the current batch (NaN when there are none).

        Keys: return_mean, success_rate, length_mean, invalid_rate (invalid steps / steps),
        num_episodes, num_dropped.
        """
        done = self.finished_episodes()
        steps = sum(s.length for s in done)
        n = len(done)
        return {
            "return_mean": sum(s.episode_return for s in done) / n if n else math.nan,
            "success_rate": sum(s.success for s in done) / n if n else math.nan,
            "length_mean": steps / n if n else math.nan,
            "invalid_rate": sum(s.invalid_count for s in done) / steps if steps else math.nan,
            "num_episodes": float(n),
            "num_dropped": float(sum(s.dropped for s in self.stats)),
        }

    def _drop(self, stats: EpisodeStats, phase: str, error: Exception) -> None:
        stats.dropped = True
        stats.done = True
        stats.error = repr(error)
        logger.warning(
            "env %s raised in %s (seed %d, episode %d, slot %d): %r; episode dropped",
            self.cfg.name, phase, stats.seed, stats.episode, stats.index, error,
        )
