"""Twenty Questions with a rule-based answerer over a fixed attribute table (no LLM).

The environment hides one object of `OBJECTS`; the agent asks yes/no questions from `QUESTIONS`
("Is it an animal?") or guesses an object ("Is it a dog?"). Answers come from the table:

    reset  -> "Find the hidden object with yes/no questions.\\n"
    action -> "Is it bigger than a car?"   or   "Is it an elephant?"
    obs    -> "Yes\\n" | "No\\n" | "Invalid\\n"

Rewards follow the ArCHer paper (Zhou et al. 2024, https://arxiv.org/abs/2402.19446): -1 per turn,
0 on the turn that names the object (which ends the episode), 20 turns at most. Text that is neither
a listed question nor a guess answers "Invalid" and costs `invalid_reward` (-1 by default, the same
as a wasted turn). Parsing ignores case, punctuation, extra spaces and the articles a/an/the.

Every object has a distinct answer vector, so the questions alone can single it out. The oracle
keeps the set of objects consistent with all answers so far and asks the question that splits that
set most evenly (largest smaller side); a guess counts as a question whose "yes" side is one object,
and on ties a guess is preferred, so with one or two candidates left the oracle guesses.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from fastarcher.envs.base import TurnBasedEnv, check_positive, unique_words

# Attribute key -> the question that asks for it.
QUESTIONS: dict[str, str] = {
    "animal": "Is it an animal?",
    "mammal": "Is it a mammal?",
    "bird": "Is it a bird?",
    "pet": "Is it a pet?",
    "wild": "Does it live in the wild?",
    "meat": "Does it eat meat?",
    "food": "Is it food?",
    "fruit": "Is it a fruit?",
    "vegetable": "Is it a vegetable?",
    "sweet": "Is it sweet?",
    "cooked": "Is it cooked?",
    "vehicle": "Is it a vehicle?",
    "engine": "Does it have an engine?",
    "wheels": "Does it have wheels?",
    "fly": "Can it fly?",
    "water": "Is it found in water?",
    "legs": "Does it have legs?",
    "big": "Is it bigger than a person?",
    "huge": "Is it bigger than a car?",
    "hand": "Can you hold it in one hand?",
    "electric": "Does it use electricity?",
    "wood": "Is it made of wood?",
    "round": "Is it round?",
    "ride": "Can you ride it?",
    "climb": "Can it climb trees?",
}

# Object -> the attributes that are true for it (all others are false).
OBJECTS: dict[str, frozenset[str]] = {
    name: frozenset(attrs.split())
    for name, attrs in {
        "dog": "animal mammal pet meat legs",
        "cat": "animal mammal pet meat legs climb",
        "horse": "animal mammal legs big ride",
        "cow": "animal mammal legs big",
        "elephant": "animal mammal wild legs big huge ride",
        "lion": "animal mammal wild meat legs big",
        "whale": "animal mammal wild meat water big huge",
        "eagle": "animal bird wild meat legs fly",
        "parrot": "animal bird pet legs fly hand",
        "penguin": "animal bird wild meat legs water",
        "shark": "animal wild meat water big",
        "snake": "animal wild meat climb",
        "frog": "animal wild meat legs water hand",
        "apple": "food fruit sweet round hand",
        "banana": "food fruit sweet hand",
        "carrot": "food vegetable hand",
        "potato": "food vegetable cooked round hand",
        "pizza": "food cooked round",
        "bread": "food cooked",
        "cake": "food sweet cooked round",
        "egg": "food cooked hand",
        "car": "vehicle engine wheels big ride",
        "bus": "vehicle engine wheels big huge ride",
        "train": "vehicle engine wheels big huge ride electric",
        "bicycle": "vehicle wheels ride",
        "airplane": "vehicle engine wheels fly big huge ride",
        "helicopter": "vehicle engine fly big ride",
        "boat": "vehicle engine water big ride wood",
        "chair": "legs wood",
        "bed": "legs wood big",
        "phone": "electric hand",
        "computer": "electric",
        "book": "hand",
        "guitar": "wood",
        "ball": "round hand",
        "clock": "electric round",
    }.items()
}

PROMPT = "Find the hidden object with yes/no questions.\n"
ANSWERS = ("Yes\n", "No\n", "Invalid\n")
_ARTICLES = frozenset({"a", "an", "the"})


def guess_text(name: str) -> str:
    """The guess action that names object `name`: "Is it a dog?" / "Is it an apple?"."""
    article = "an" if name[0] in "aeiou" else "a"
    return f"Is it {article} {name}?"


def _key(text: str) -> str:
    """Parsing key: lower case, letters and digits only, single spaces, no articles."""
    cleaned = "".join(ch if ch.isalnum() else " " for ch in text.lower())
    return " ".join(word for word in cleaned.split() if word not in _ARTICLES)


VOCAB_WORDS: tuple[str, ...] = unique_words(
    [PROMPT, *ANSWERS, *QUESTIONS.values(), *(guess_text(name) for name in OBJECTS)]
)
"""Words and symbols of twenty_questions texts."""


@dataclass(kw_only=True)
class TwentyQuestionsConfig:
    """Twenty Questions settings."""

    max_turns: int = 20
    """Questions per episode (invalid ones included); 20 as in the ArCHer paper."""
    num_objects: int | None = None
    """Hide only one of the first N objects of the table (None: all 36); the guess choices shrink to match."""
    turn_reward: float = -1.0
    """Reward of every turn that does not name the object."""
    invalid_reward: float = -1.0
    """Reward for text that is neither a listed question nor a guess; -1 costs the same as a wasted turn."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, value and rule when the config is unusable."""
        check_positive("env.twenty_questions.max_turns", self.max_turns)
        if self.num_objects is not None:
            check_positive("env.twenty_questions.num_objects", self.num_objects)
            if self.num_objects > len(OBJECTS):
                raise ValueError(
                    f"env.twenty_questions.num_objects ({self.num_objects}) must be at most the "
                    f"table size ({len(OBJECTS)}) or None"
                )


class TwentyQuestions(TurnBasedEnv):
    """Identify the hidden object with yes/no questions answered from the attribute table."""

    name = "twenty_questions"
    invalid_obs = "Invalid\n"

    def __init__(self, cfg: TwentyQuestionsConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else TwentyQuestionsConfig()
        self.cfg.validate()
        self.max_turns = self.cfg.max_turns
        self.invalid_reward = self.cfg.invalid_reward
        self.objects = list(OBJECTS)[: self.cfg.num_objects]
        # Each choice as (text, attribute key or None, guessed object or None).
        self._questions = [(text, attr, None) for attr, text in QUESTIONS.items()]
        self._guesses = [(guess_text(name), None, name) for name in self.objects]
        self._choices = [text for text, _, _ in self._questions + self._guesses]
        self._by_key = {_key(text): (attr, obj) for text, attr, obj in self._questions + self._guesses}
        assert len(self._by_key) == len(self._choices), "two choices share a parsing key"
        self.target = self.objects[0]
        self._candidates = list(self.objects)

    def action_choices(self) -> list[str]:
        return list(self._choices)

    def observation_texts(self) -> list[str]:
        return list(ANSWERS)

    @property
    def candidates(self) -> list[str]:
        """Objects consistent with every answer given so far in this episode."""
        return list(self._candidates)

    def oracle_action(self) -> str:
        best_text, best_score = self._choices[0], (-1, 0)
        for text, attr, obj in self._guesses + self._questions:  # guesses first: they win ties
            yes = sum(1 for c in self._candidates if self._answer(c, attr, obj))
            score = (min(yes, len(self._candidates) - yes), int(obj is not None and yes == 1))
            if score > best_score:
                best_text, best_score = text, score
        return best_text

    @staticmethod
    def _answer(candidate: str, attr: str | None, obj: str | None) -> bool:
        return candidate == obj if obj is not None else attr in OBJECTS[candidate]

    def _reset(self, rng: random.Random) -> str:
        self.target = rng.choice(self.objects)
        self._candidates = list(self.objects)
        return PROMPT

    def _parse(self, action_text: str) -> str | None:
        key = _key(action_text)
        return key if key in self._by_key else None

    def _apply(self, action: str) -> tuple[str, float, bool, bool]:
        attr, obj = self._by_key[action]
        yes = self._answer(self.target, attr, obj)
        self._candidates = [c for c in self._candidates if self._answer(c, attr, obj) == yes]
        if obj is not None and yes:
            return "Yes\n", 0.0, True, True
        return ("Yes\n" if yes else "No\n"), self.cfg.turn_reward, False, False
