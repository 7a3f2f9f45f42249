"""Text environments for multi-turn agents: config, factory, and the shared word list.

    from fastarcher.envs import EnvConfig, make_env
    env = make_env(EnvConfig(name="guess_number"))
    obs = env.reset(seed=0)                        # "Guess a number from 1 to 16.\\n"
    obs, reward, done, info = env.step("8")        # "higher\\n", 0.0, False, {...}

Environments (docs/envs.md describes texts, rewards and measured baselines): guess_number,
twenty_questions, frozenlake, sokoban; or one of your own by import path, `package.module:ClassName`
(fastarcher/envs/user.py, docs/custom_env.md). `BatchedEnvRunner` (fastarcher/envs/runner.py) steps many.
`python -m fastarcher.envs.evaluate` measures the random and oracle policies of each env.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from fastarcher.envs import frozenlake, guess_number, sokoban, twenty_questions
from fastarcher.envs.base import Env, check_positive, split_words
from fastarcher.envs.frozenlake import FrozenLake, FrozenLakeConfig
from fastarcher.envs.guess_number import GuessNumber, GuessNumberConfig
from fastarcher.envs.qa import QA, QAConfig
from fastarcher.envs.sokoban import Sokoban, SokobanConfig
from fastarcher.envs.twenty_questions import TwentyQuestions, TwentyQuestionsConfig
from fastarcher.envs.user import make_user_env
from fastarcher.imports import is_import_path

ENV_NAMES: tuple[str, ...] = ("guess_number", "twenty_questions", "frozenlake", "sokoban")
"""The built-in games."""
BUILTIN_ENVS: tuple[str, ...] = (*ENV_NAMES, "qa")
"""The games and `qa`, question answering from dataset files (fastarcher/envs/qa.py)."""

_ENV_CLASSES = {
    "guess_number": GuessNumber,
    "twenty_questions": TwentyQuestions,
    "frozenlake": FrozenLake,
    "sokoban": Sokoban,
    "qa": QA,
}


@dataclass(kw_only=True)
class EnvConfig:
    """Which environment to run, and the settings of each."""

    name: str = "guess_number"
    """Environment: guess_number, twenty_questions, frozenlake, sokoban, qa (dataset questions), or your own
    class by import path, `package.module:ClassName` (docs/custom_env.md)."""
    max_turns: int | None = None
    """Turns per episode for the chosen env (None: that env's own max_turns)."""
    options: dict[str, int | float | bool | str] = field(default_factory=dict)
    """Keyword arguments for your own env class's constructor (`--env.options size 5 label x`); only with
    an import-path env.name."""
    guess_number: GuessNumberConfig = field(default_factory=GuessNumberConfig)
    """Settings used when name is guess_number."""
    twenty_questions: TwentyQuestionsConfig = field(default_factory=TwentyQuestionsConfig)
    """Settings used when name is twenty_questions."""
    frozenlake: FrozenLakeConfig = field(default_factory=FrozenLakeConfig)
    """Settings used when name is frozenlake."""
    sokoban: SokobanConfig = field(default_factory=SokobanConfig)
    """Settings used when name is sokoban."""
    qa: QAConfig = field(default_factory=QAConfig)
    """Settings used when name is qa: dataset files, reward, tools."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, value and rule when the config is unusable."""
        if self.max_turns is not None:
            check_positive("env.max_turns", self.max_turns)
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"env.options ({self.options!r}) must map argument names to values")
        if self.user_env:
            return  # imported and checked by make_env, which the trainer's config check calls before any work
        if self.name not in BUILTIN_ENVS:
            raise ValueError(f"env.name ({self.name!r}) must be one of {', '.join(BUILTIN_ENVS)}, or an import path "
                             f"'package.module:ClassName' of your own env class")
        if self.options:
            raise ValueError(f"env.options ({self.options!r}) are arguments for an env class of your own; the "
                             f"built-in env {self.name!r} takes env.{self.name}.* settings instead")
        try:
            self.env_config().validate()
        except ValueError as error:
            if self.max_turns is None:
                raise
            raise ValueError(f"{error} (env.max_turns ({self.max_turns}) overrides env.{self.name}.max_turns)") from None

    @property
    def user_env(self) -> bool:
        """Whether `name` is an import path to an env class of the user's own."""
        return is_import_path(self.name)

    def env_config(self):
        """The chosen env's sub-config with the `max_turns` override applied (a copy when overridden)."""
        sub = getattr(self, self.name)
        if self.max_turns is not None and self.max_turns != sub.max_turns:
            sub = dataclasses.replace(sub, max_turns=self.max_turns)
        return sub


def make_env(cfg: EnvConfig) -> Env:
    """Build the environment that `cfg.name` selects (validated first)."""
    cfg.validate()
    if cfg.user_env:
        return make_user_env(cfg.name, cfg.options, cfg.max_turns)
    return _ENV_CLASSES[cfg.name](cfg.env_config())


@dataclass(frozen=True)
class TokenSizes:
    """What one env config needs of the token limits (see `token_sizes`)."""

    max_obs: int
    """Longest observation a step can answer, in tokens."""
    max_action: int | None
    """Longest valid action in tokens, the stop token included (None: free-form replies, bounded only by
    rollout.max_new_tokens)."""


def token_sizes(cfg: EnvConfig, encode: Callable[[str], list[int]],
                obs_encode: Callable[[str], list[int]] | None = None) -> TokenSizes:
    """Token sizes of the env's longest observation and action under `encode` (text → token ids);
    observations under `obs_encode` when given (the dialogue's wrapping of them, `fastarcher.chat`)."""
    env = make_env(cfg)
    free_form = getattr(env, "free_form_actions", False)
    obs_encode = obs_encode or encode
    return TokenSizes(max_obs=max(len(obs_encode(text)) for text in env.observation_texts()),
                      max_action=None if free_form else max(len(encode(text)) for text in env.action_choices()) + 1)


def _merge(*word_lists: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(word for words in word_lists for word in words))


VOCAB_WORDS: tuple[str, ...] = _merge(
    guess_number.VOCAB_WORDS, twenty_questions.VOCAB_WORDS, frozenlake.VOCAB_WORDS, sokoban.VOCAB_WORDS
)
"""Every word (letter run, digit run) and symbol the built-in envs print or accept, in a fixed order.

Whitespace (" ", "\\n") is not included. Numbers cover 0..100 (guess_number's range limit for this
list); `vocab_words(cfg)` adds whatever else a specific config can print.
"""


def vocab_words(cfg: EnvConfig) -> tuple[str, ...]:
    """VOCAB_WORDS plus any words that only this config prints (guess_number numbers above 100)."""
    extra: list[str] = []
    if cfg.name == "guess_number":
        sub = cfg.env_config()
        extra = [str(n) for n in range(sub.low, sub.high + 1)]
    return _merge(VOCAB_WORDS, tuple(extra))


from fastarcher.envs.runner import BatchedEnvRunner, EpisodeStats, StepResult  # noqa: E402 (needs EnvConfig)

__all__ = [
    "BUILTIN_ENVS",
    "BatchedEnvRunner",
    "ENV_NAMES",
    "VOCAB_WORDS",
    "Env",
    "EnvConfig",
    "EpisodeStats",
    "FrozenLake",
    "FrozenLakeConfig",
    "GuessNumber",
    "GuessNumberConfig",
    "QA",
    "QAConfig",
    "Sokoban",
    "SokobanConfig",
    "StepResult",
    "TokenSizes",
    "TwentyQuestions",
    "TwentyQuestionsConfig",
    "make_env",
    "split_words",
    "token_sizes",
    "vocab_words",
]
