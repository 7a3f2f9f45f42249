"""Protocol rules shared by every environment (fastarcher/envs/base.py), configs, and VOCAB_WORDS."""
import random

import pytest
import torch

from fastarcher.envs import (
    ENV_NAMES,
    VOCAB_WORDS,
    Env,
    EnvConfig,
    FrozenLakeConfig,
    GuessNumberConfig,
    SokobanConfig,
    TwentyQuestionsConfig,
    frozenlake,
    guess_number,
    make_env,
    sokoban,
    split_words,
    twenty_questions,
    vocab_words,
)
from fastarcher.envs.base import normalize_action

torch.manual_seed(0)

# Configs whose texts must all be covered by VOCAB_WORDS (defaults plus non-default variants).
VOCAB_CONFIGS = [
    EnvConfig(name="guess_number"),
    EnvConfig(name="guess_number", guess_number=GuessNumberConfig(low=0, high=100, max_turns=8)),
    EnvConfig(name="twenty_questions"),
    EnvConfig(name="frozenlake"),
    EnvConfig(name="frozenlake", max_turns=30, frozenlake=FrozenLakeConfig(slippery=True, random_map_size=7)),
    EnvConfig(name="sokoban"),
    EnvConfig(name="sokoban", sokoban=SokobanConfig(width=8, height=7, num_boxes=2)),
]

GARBAGE = ["", "   ", "\n", "hello world", "Is it a unicorn?", "42" * 50, "lef t", "ùñíçødé", "up down"]


def play(env: Env, seed: int, actions_of) -> list[tuple]:
    """Run one episode; `actions_of(env, turn)` picks each action. Returns the transcript."""
    transcript = [(env.reset(seed),)]
    done = False
    while not done:
        action = actions_of(env, len(transcript))
        obs, reward, done, info = env.step(action)
        transcript.append((action, obs, reward, done, info))
    return transcript


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_satisfies_protocol_and_text_rules(name):
    env = make_env(EnvConfig(name=name))
    assert isinstance(env, Env)
    assert env.name == name
    choices = env.action_choices()
    assert len(choices) == len(set(choices)) > 1
    rng = random.Random(0)
    for seed in range(20):
        prompt = env.reset(seed)
        assert isinstance(prompt, str) and prompt.endswith("\n")
        assert env.action_choices() == choices  # same for every seed
        done, turns = False, 0
        while not done:
            action = env.random_valid_action(rng)
            assert action in choices
            obs, reward, done, info = env.step(action)
            turns += 1
            assert obs.endswith("\n") and isinstance(reward, float) and isinstance(done, bool)
            assert info["invalid"] is False and isinstance(info["success"], bool)
            assert env.action_choices() == choices  # same for every state
        assert turns <= env.max_turns


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_garbage_actions_are_penalised_not_raised(name):
    env = make_env(EnvConfig(name=name))
    env.reset(3)
    for text in GARBAGE[: env.max_turns - 1]:
        obs, reward, done, info = env.step(text)
        assert info["invalid"] is True and info["success"] is False and not done
        assert obs.strip().lower() == "invalid" and reward < 0
    obs, reward, done, info = env.step(None)  # not even a string
    assert info["invalid"] is True


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_ends_after_max_turns_of_invalid_actions(name):
    cfg = EnvConfig(name=name, max_turns=3)
    env = make_env(cfg)
    env.reset(0)
    results = [env.step("???") for _ in range(3)]
    assert [done for _, _, done, _ in results] == [False, False, True]
    assert results[-1][3]["truncated"] is True
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("???")


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_is_deterministic_per_seed(name):
    def run(seed):
        rng = random.Random(seed)
        return play(make_env(EnvConfig(name=name)), seed, lambda env, t: env.random_valid_action(rng))

    assert run(5) == run(5)
    assert any(run(5) != run(seed) for seed in range(6, 12))


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_oracle_solves_default_config(name):
    env = make_env(EnvConfig(name=name))
    for seed in range(50):
        transcript = play(env, seed, lambda env, t: env.oracle_action())
        assert transcript[-1][4]["success"] is True, (name, seed, transcript)
        assert all(step[4]["invalid"] is False for step in transcript[1:])


def test_step_before_reset_raises():
    env = make_env(EnvConfig(name="guess_number"))
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("3")


def test_normalize_action_is_lenient_on_case_space_and_trailing_punctuation():
    assert normalize_action("  LEFT.\n") == "left"
    assert normalize_action("Is  it a DOG ?!") == "is it a dog"
    assert normalize_action("8,") == "8"


def test_split_words_cuts_letter_and_digit_runs_and_single_symbols():
    assert split_words("Guess a number from 1 to 16.\n") == ["Guess", "a", "number", "from", "1", "to", "16", "."]
    assert split_words("#_$.@#\n") == ["#", "_", "$", ".", "@", "#"]
    assert split_words("ab12cd") == ["ab", "12", "cd"]


def test_vocab_words_is_ordered_unique_and_merges_every_module():
    assert isinstance(VOCAB_WORDS, tuple) and len(VOCAB_WORDS) == len(set(VOCAB_WORDS))
    for module in (guess_number, twenty_questions, frozenlake, sokoban):
        assert set(module.VOCAB_WORDS) <= set(VOCAB_WORDS)
        assert len(module.VOCAB_WORDS) == len(set(module.VOCAB_WORDS))
    assert {str(n) for n in range(101)} <= set(VOCAB_WORDS)
    assert not any(word.isspace() for word in VOCAB_WORDS)
    # Words are whole runs: no entry mixes letters, digits and symbols.
    for word in VOCAB_WORDS:
        assert split_words(word) == [word]
    assert VOCAB_WORDS.index("Guess") < VOCAB_WORDS.index("Find") < VOCAB_WORDS.index("Reach")


@pytest.mark.parametrize("cfg", VOCAB_CONFIGS, ids=lambda c: c.name)
def test_vocab_words_cover_every_text_of_random_and_oracle_episodes(cfg):
    vocab = set(VOCAB_WORDS)
    env = make_env(cfg)
    rng = random.Random(0)
    texts = list(env.action_choices())
    for seed in range(60):
        policy = (lambda e, t: e.oracle_action()) if seed % 2 else (lambda e, t: e.random_valid_action(rng))
        for step in play(env, seed, policy):
            texts.extend(x for x in step if isinstance(x, str))
    missing = {word for text in texts for word in split_words(text)} - vocab
    assert not missing, missing


def test_vocab_words_of_config_adds_numbers_beyond_100():
    cfg = EnvConfig(name="guess_number", guess_number=GuessNumberConfig(low=90, high=120))
    words = vocab_words(cfg)
    assert words[: len(VOCAB_WORDS)] == VOCAB_WORDS
    assert words[len(VOCAB_WORDS):] == tuple(str(n) for n in range(101, 121))


def test_env_config_max_turns_override_applies_to_chosen_env():
    cfg = EnvConfig(name="frozenlake", max_turns=3)
    assert make_env(cfg).max_turns == 3
    assert cfg.frozenlake.max_turns == 10  # the sub-config itself is not mutated
    assert make_env(EnvConfig(name="twenty_questions")).max_turns == 20


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: EnvConfig(name="chess"), r"env.name \('chess'\) must be one of"),
        (lambda: EnvConfig(max_turns=0), r"env.max_turns \(0\) must be a positive integer"),
        (lambda: GuessNumberConfig(low=5, high=5), r"env.guess_number.high \(5\) must be .* greater than env.guess_number.low \(5\)"),
        (lambda: GuessNumberConfig(low=-1), r"env.guess_number.low \(-1\) must be an integer >= 0"),
        (lambda: GuessNumberConfig(max_turns=-2), r"env.guess_number.max_turns \(-2\)"),
        (lambda: TwentyQuestionsConfig(num_objects=99), r"env.twenty_questions.num_objects \(99\) must be at most"),
        (lambda: FrozenLakeConfig(random_map_size=1), r"env.frozenlake.random_map_size \(1\) must be None or an integer in \[2, 32\]"),
        (lambda: FrozenLakeConfig(hole_prob=0.95), r"env.frozenlake.hole_prob \(0.95\) must be in \[0, 0.8\]"),
        (lambda: SokobanConfig(width=4), r"env.sokoban.width \(4\) must be an integer in \[5, 16\]"),
        (lambda: SokobanConfig(num_boxes=3), r"env.sokoban.num_boxes \(3\) must be at most 2 for a 6x6 room"),
        (lambda: SokobanConfig(min_solution_moves=5, max_solution_moves=4), r"env.sokoban.max_solution_moves \(4\) must be >="),
        (lambda: EnvConfig(name="sokoban", max_turns=1), r"env.sokoban.max_turns \(1\) must be >= .*env.max_turns \(1\) overrides"),
    ],
)
def test_config_validation_names_field_value_and_rule(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_env_config_parses_from_tyro_flags():
    tyro = pytest.importorskip("tyro")
    cfg = tyro.cli(
        EnvConfig,
        args=["--name", "frozenlake", "--frozenlake.slippery", "--max-turns", "7", "--frozenlake.random-map-size", "5"],
    )
    env = make_env(cfg)
    assert env.max_turns == 7 and env.cfg.slippery and env.cfg.random_map_size == 5
