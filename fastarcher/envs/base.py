"""The text-environment protocol shared by every fastarcher environment, and its common bookkeeping.

An environment speaks plain text: `reset(seed)` returns the task prompt, `step(action_text)` returns
the next observation, a reward, a done flag and an info dict. Observations always end with "\\n" so
that a dialogue is the plain concatenation prompt + action + "\\n" + observation + ...

Rules every environment follows (tested per environment in tests/test_envs_*.py):
- an invalid or unparseable action never raises: it costs the environment's `invalid_reward`, leaves
  the state unchanged, answers a short "invalid" observation and sets `info["invalid"] = True`;
- parsing is lenient: surrounding whitespace, letter case and trailing punctuation are ignored;
- `info` always holds `invalid` and `success` (true on the step that solves the task) and
  `truncated` (true when the episode ended only because `max_turns` steps were taken);
- the episode ends after `max_turns` steps, invalid ones included;
- everything random is drawn from a `random.Random(seed)` made at reset, so an episode is a pure
  function of (config, seed, actions).

Word splitting: `split_words` cuts text into maximal runs of letters, maximal runs of digits and
single other characters; each env module exports `VOCAB_WORDS`, the words and symbols (whitespace
excluded) that its prompts, observations and actions can contain, so that a word-level tokenizer
built from them covers every environment text.
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Protocol, runtime_checkable

WORD_PATTERN = re.compile(r"[A-Za-z]+|[0-9]+|[^A-Za-z0-9]")
"""One token of environment text: a run of letters, a run of digits, or any single other character."""

_TRAILING_PUNCTUATION = ".,!?;:'\"`"


@runtime_checkable
class Env(Protocol):
    """A multi-turn text environment (see the module docstring for the rules)."""

    name: str
    max_turns: int

    def reset(self, seed: int) -> str:
        """Start a new episode; return the first observation (the task prompt), ending with "\\n"."""
        ...

    def step(self, action_text: str) -> tuple[str, float, bool, dict]:
        """Apply one action; return (observation ending with "\\n", reward, done, info)."""
        ...

    def action_choices(self) -> list[str]:
        """The fixed list of valid action strings of this env config (same for every state and seed)."""
        ...

    def oracle_action(self) -> str:
        """A good (optimal where stated) action in the current state, for demonstrations."""
        ...

    def random_valid_action(self, rng: random.Random) -> str:
        """A valid action drawn uniformly from `action_choices()` with the caller's generator."""
        ...

    def observation_texts(self) -> list[str]:
        """Texts that bound what `step` can answer (the longest observations of this config): the
        trainer tokenises them to check replay.max_obs_len and rollout.context_tokens before any work."""
        ...


def split_words(text: str) -> list[str]:
    """Split text into words (letter runs, digit runs) and single symbols, dropping whitespace."""
    return [token for token in WORD_PATTERN.findall(text) if not token.isspace()]


def unique_words(texts: Iterable[str]) -> tuple[str, ...]:
    """All words and symbols of `texts` in first-seen order, without duplicates."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in split_words(text):
            seen.setdefault(word, None)
    return tuple(seen)


def normalize_action(text: str) -> str:
    """Lower-case, strip whitespace and trailing punctuation, collapse inner whitespace."""
    text = " ".join(text.split()).lower()
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def check_positive(field: str, value: int) -> None:
    """Raise ValueError unless `value` is a positive int (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} ({value!r}) must be a positive integer")


class TurnBasedEnv:
    """Common bookkeeping: turn counting, the max_turns limit, invalid actions, info keys.

    Subclasses set `name`, `max_turns`, `invalid_reward`, `invalid_obs` and implement
    `_reset(rng) -> prompt`, `_parse(action_text) -> canonical action or None` and
    `_apply(action) -> (obs, reward, terminal, success)`.
    """

    name: str = "base"
    max_turns: int = 1
    invalid_reward: float = -0.1
    invalid_obs: str = "invalid\n"

    def __init__(self) -> None:
        self._rng = random.Random(0)
        self._turn = 0
        self._started = False
        self._done = False

    # -- public protocol ---------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        self._rng = random.Random(seed)
        self._turn = 0
        self._started = True
        self._done = False
        return self._reset(self._rng)

    def step(self, action_text: str) -> tuple[str, float, bool, dict]:
        if not self._started:
            raise RuntimeError(f"{self.name}: step() called before reset()")
        if self._done:
            raise RuntimeError(f"{self.name}: step() called after the episode ended; call reset()")
        self._turn += 1
        action = self._parse(action_text) if isinstance(action_text, str) else None
        if action is None:
            obs, reward, terminal, success = self.invalid_obs, self.invalid_reward, False, False
        else:
            obs, reward, terminal, success = self._apply(action)
        truncated = not terminal and self._turn >= self.max_turns
        self._done = terminal or truncated
        info = {"invalid": action is None, "success": success, "truncated": truncated, "turn": self._turn}
        return obs, float(reward), self._done, info

    def random_valid_action(self, rng: random.Random) -> str:
        return rng.choice(self.action_choices())

    @property
    def turn(self) -> int:
        """Steps taken in the current episode."""
        return self._turn

    @property
    def done(self) -> bool:
        """Whether the current episode has ended."""
        return self._done

    # -- subclass hooks ----------------------------------------------------------------------------
    def action_choices(self) -> list[str]:
        raise NotImplementedError

    def observation_texts(self) -> list[str]:
        raise NotImplementedError

    def oracle_action(self) -> str:
        raise NotImplementedError

    def _reset(self, rng: random.Random) -> str:
        raise NotImplementedError

    def _parse(self, action_text: str) -> str | None:
        raise NotImplementedError

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        raise NotImplementedError
