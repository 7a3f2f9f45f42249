"""Guess the number: find a hidden integer in [low, high] from "higher"/"lower" feedback.

Text format (default config):
    reset  -> "Guess a number from 1 to 16.\\n"
    action -> "7"                     (one of the numbers, as a decimal string)
    obs    -> "higher\\n" | "lower\\n" | "correct\\n" | "invalid\\n"
"higher" means the hidden number is greater than the guess.

Rewards: 1.0 on the correct guess (which ends the episode), 0.0 for any other valid guess, and
`invalid_reward` (-0.1) for text that is not a number in [low, high]. The episode also ends after
`max_turns` guesses. The oracle is binary search over the interval still consistent with the
feedback, so with the defaults it always succeeds within 5 turns (ceil(log2(16 + 1)) = 5).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from fastarcher.envs.base import TurnBasedEnv, check_positive, normalize_action, unique_words

MAX_VOCAB_NUMBER = 100
"""VOCAB_WORDS holds the numbers 0..MAX_VOCAB_NUMBER; wider ranges need `vocab_words(cfg)`."""


@dataclass(kw_only=True)
class GuessNumberConfig:
    """Guess-the-number settings."""

    low: int = 1
    """Smallest possible hidden number (>= 0)."""
    high: int = 16
    """Largest possible hidden number (> low)."""
    max_turns: int = 5
    """Guesses per episode (invalid ones included)."""
    invalid_reward: float = -0.1
    """Reward for text that is not a number in [low, high]."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, value and rule when the config is unusable."""
        if isinstance(self.low, bool) or not isinstance(self.low, int) or self.low < 0:
            raise ValueError(f"env.guess_number.low ({self.low!r}) must be an integer >= 0")
        if isinstance(self.high, bool) or not isinstance(self.high, int) or self.high <= self.low:
            raise ValueError(
                f"env.guess_number.high ({self.high!r}) must be an integer greater than "
                f"env.guess_number.low ({self.low})"
            )
        check_positive("env.guess_number.max_turns", self.max_turns)


def _prompt(low: int, high: int) -> str:
    return f"Guess a number from {low} to {high}.\n"


FEEDBACK = ("higher\n", "lower\n", "correct\n", "invalid\n")

VOCAB_WORDS: tuple[str, ...] = unique_words(
    [_prompt(0, 1), *FEEDBACK, *(str(n) for n in range(MAX_VOCAB_NUMBER + 1))]
)
"""Words and symbols of guess_number texts for any range within 0..MAX_VOCAB_NUMBER."""


class GuessNumber(TurnBasedEnv):
    """Find the hidden number in [low, high] with higher/lower feedback."""

    name = "guess_number"

    def __init__(self, cfg: GuessNumberConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else GuessNumberConfig()
        self.cfg.validate()
        self.max_turns = self.cfg.max_turns
        self.invalid_reward = self.cfg.invalid_reward
        self._choices = [str(n) for n in range(self.cfg.low, self.cfg.high + 1)]
        self.target = self.cfg.low
        self._lo, self._hi = self.cfg.low, self.cfg.high

    def action_choices(self) -> list[str]:
        return list(self._choices)

    def observation_texts(self) -> list[str]:
        return list(FEEDBACK)

    def oracle_action(self) -> str:
        # Binary search over the interval that every answer so far allows.
        return str((self._lo + self._hi) // 2)

    def _reset(self, rng: random.Random) -> str:
        self.target = rng.randint(self.cfg.low, self.cfg.high)
        self._lo, self._hi = self.cfg.low, self.cfg.high
        return _prompt(self.cfg.low, self.cfg.high)

    def _parse(self, action_text: str) -> str | None:
        text = normalize_action(action_text)
        if not text.isascii() or not text.isdigit():
            return None
        guess = int(text)
        return str(guess) if self.cfg.low <= guess <= self.cfg.high else None

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        guess = int(action)
        if guess == self.target:
            self._lo = self._hi = guess
            return "correct\n", 1.0, True, True
        if guess < self.target:
            self._lo = max(self._lo, guess + 1)
            return "higher\n", 0.0, False, False
        self._hi = min(self._hi, guess - 1)
        return "lower\n", 0.0, False, False
