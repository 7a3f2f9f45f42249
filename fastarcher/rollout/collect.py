"""Play episodes: every turn, one batched engine call for all live environments.

The state of an episode is its dialogue as token ids, built by concatenating segment ids
(prompt, then action ⊕ observation per turn), so s' = s ⊕ a ⊕ o holds exactly for the replay buffer.
With a context window of N tokens the state is the last N tokens of the dialogue, and
s' = last N tokens of (s ⊕ a ⊕ o) holds exactly as well (the tail of a tail is the tail).
Each finished turn becomes one utterance-level transition with its discounted Monte-Carlo return.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastarcher.chat import RAW, DialogueFormat
from fastarcher.envs.runner import BatchedEnvRunner
from fastarcher.model import encode, encode_batch
from fastarcher.replay import TransitionBatch
from fastarcher.rollout.base import SamplingParams


@dataclass
class Turn:
    state: list[int]
    action: list[int]
    obs: list[int]
    reward: float
    done: bool
    invalid: bool
    policy_version: int = -1
    """Weight syncs the engine had received when it sampled the action (-1: a scripted picker's)."""


@dataclass
class Episode:
    seed: int
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    dropped: bool = False

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.turns)

    def mc_returns(self, gamma: float) -> list[float]:
        returns, running = [], 0.0
        for turn in reversed(self.turns):
            running = turn.reward + gamma * running
            returns.append(running)
        return returns[::-1]


@dataclass
class RolloutResult:
    episodes: list[Episode]
    generated_tokens: int = 0
    engine_calls: int = 0
    reused_tokens: int = 0
    """Dialogue tokens the engine took from its per-episode KV cache instead of prefilling again."""

    def kept(self) -> list[Episode]:
        return [e for e in self.episodes if not e.dropped and e.turns]

    def stats(self, prefix: str) -> dict[str, float]:
        """Episode means over this rank's kept episodes (averaged over ranks later)."""
        kept = self.kept()
        n = max(len(kept), 1)
        turns = sum(len(e.turns) for e in kept)
        return {
            f"{prefix}/return_mean": sum(e.total_reward for e in kept) / n,
            f"{prefix}/success_rate": sum(e.success for e in kept) / n,
            f"{prefix}/episode_len": turns / n,
            f"{prefix}/invalid_rate": sum(t.invalid for e in kept for t in e.turns) / max(turns, 1),
            f"count/{prefix}_episodes": float(len(kept)),
            f"count/{prefix}_dropped": float(len(self.episodes) - len(kept)),
        }

    def transitions(self, gamma: float, pad_id: int) -> TransitionBatch:
        rows = []
        for episode in self.kept():
            for turn, ret in zip(episode.turns, episode.mc_returns(gamma)):
                rows.append((turn, ret))
        return transitions_from_turns(rows, pad_id)


def close_utterance(tokens: list[int], stop_id: int) -> list[int]:
    """An utterance cut by max_new_tokens still ends the turn: close it with the stop token so the
    dialogue stays well formed."""
    return tokens if tokens and tokens[-1] == stop_id else tokens + [stop_id]


def sampled_lengths(action_len: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """How many tokens of each closed utterance the policy sampled: all of them, except the stop token
    `close_utterance` appended to one cut at max_new_tokens (the only way a closed one gets longer)."""
    return action_len.clamp(max=max_new_tokens)


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids → (B, T) int64 and lengths (B,)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(width, 1)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def transitions_from_turns(rows: list[tuple[Turn, float]], pad_id: int) -> TransitionBatch:
    state_ids, state_len = pad_rows([t.state for t, _ in rows], pad_id)
    action_ids, action_len = pad_rows([t.action for t, _ in rows], pad_id)
    obs_ids, obs_len = pad_rows([t.obs for t, _ in rows], pad_id)
    return TransitionBatch(
        state_ids=state_ids, state_len=state_len, action_ids=action_ids, action_len=action_len,
        next_obs_ids=obs_ids, next_obs_len=obs_len,
        reward=torch.tensor([t.reward for t, _ in rows], dtype=torch.float32),
        done=torch.tensor([float(t.done) for t, _ in rows], dtype=torch.float32),
        mc_return=torch.tensor([r for _, r in rows], dtype=torch.float32),
        pad_id=pad_id,
    )


ActionPicker = Callable[[BatchedEnvRunner, list[int]], list[str]]
"""Scripted policy: (runner, live env indices) → action texts (for demonstrations and baselines)."""


def play_episodes(
    runner: BatchedEnvRunner,
    seeds: list[int],
    *,
    tokenizer,
    stop_id: int,
    engine=None,
    params: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    picker: ActionPicker | None = None,
    context_tokens: int = 0,
    kv_cache: bool = True,
    fmt: DialogueFormat = RAW,
) -> RolloutResult:
    """Run one episode per seed to the end, with the engine (sampling/greedy) or a scripted picker.

    context_tokens > 0: the engine sees, and each turn stores as its state, only the last
    `context_tokens` tokens of the dialogue. kv_cache: an engine that can (`open_dialogues`) keeps each
    episode's keys/values between turns and feeds only the new tokens (same tokens and log-probs). fmt: the
    text around observations (raw, or the chat template's turns; `fastarcher.chat`)."""
    if (engine is None) == (picker is None):
        raise ValueError("play_episodes needs exactly one of engine or picker")
    if context_tokens < 0:
        raise ValueError(f"context_tokens ({context_tokens}) must not be negative")

    def window(ids: list[int]) -> list[int]:
        return ids[-context_tokens:] if context_tokens else ids

    first_obs = runner.reset(seeds)
    episodes = [Episode(seed=s) for s in seeds]
    states = [window(ids) for ids in encode_batch(tokenizer, [fmt.first(obs) for obs in first_obs])]
    result = RolloutResult(episodes=episodes)
    open_dialogues = getattr(engine, "open_dialogues", None) if kv_cache else None
    dialogues = open_dialogues(context_tokens) if open_dialogues is not None else None
    while True:
        live = runner.live_indices()
        if not live:
            break
        if engine is not None:
            prompts = [states[i] for i in live]
            if dialogues is not None:
                dialogues.keep_only(live)  # free finished episodes' keys/values
                out = dialogues.generate(live, prompts, params, generator)
            else:
                out = engine.generate(prompts, params, generator)
            actions = out.token_ids
            version = out.policy_version
            result.engine_calls += out.num_calls
            result.generated_tokens += sum(len(a) for a in actions)
            actions = [close_utterance(a, stop_id) for a in actions]
            texts = [tokenizer.decode(a[:-1]) for a in actions]
        else:
            texts = picker(runner, live)
            actions = [encode(tokenizer, t) + [stop_id] for t in texts]
            version = -1
        steps = runner.step({i: t for i, t in zip(live, texts)})  # one StepResult per slot, ascending
        kept = iter(encode_batch(tokenizer, [fmt.next(step.obs) for step in steps if not step.dropped]))
        for step, action in zip(steps, actions):
            episode = episodes[step.index]
            if step.dropped:
                episode.dropped = True
                continue
            obs_ids = next(kept)
            episode.turns.append(Turn(state=states[step.index], action=action, obs=obs_ids,
                                      reward=float(step.reward), done=step.done,
                                      invalid=bool(step.info.get("invalid", False)), policy_version=version))
            episode.success |= bool(step.info.get("success", False))
            states[step.index] = window(states[step.index] + action + obs_ids)
    if dialogues is not None:
        result.reused_tokens = dialogues.reused_tokens
    for stats in runner.stats:  # a reset that raised never produced a live slot
        episodes[stats.index].dropped |= stats.dropped
    return result


def random_picker(rng: random.Random) -> ActionPicker:
    return lambda runner, live: runner.random_actions(rng)


def oracle_picker(runner: BatchedEnvRunner, live: list[int]) -> list[str]:
    return runner.oracle_actions()
