"""Guess-the-number rules (fastarcher/envs/guess_number.py): feedback, rewards, oracle, baselines."""
import random

import pytest
import torch

from fastarcher.envs import EnvConfig, GuessNumber, GuessNumberConfig, make_env
from fastarcher.envs.evaluate import evaluate_policy

torch.manual_seed(0)


def env_with_target(target: int, cfg: GuessNumberConfig | None = None) -> GuessNumber:
    """A reset env whose hidden number is `target` (found by scanning seeds, not by patching)."""
    env = GuessNumber(cfg)
    for seed in range(10_000):
        env.reset(seed)
        if env.target == target:
            return env
    raise AssertionError(f"no seed hides {target}")


def test_guess_number_prompt_and_choices():
    env = GuessNumber()
    assert env.reset(0) == "Guess a number from 1 to 16.\n"
    assert env.action_choices() == [str(n) for n in range(1, 17)]
    assert GuessNumber(GuessNumberConfig(low=3, high=5)).reset(0) == "Guess a number from 3 to 5.\n"


def test_guess_number_feedback_points_to_the_target():
    env = env_with_target(11)
    assert env.step("4") == ("higher\n", 0.0, False, {"invalid": False, "success": False, "truncated": False, "turn": 1})
    assert env.step("15")[:3] == ("lower\n", 0.0, False)
    assert env.step("12")[:3] == ("lower\n", 0.0, False)
    obs, reward, done, info = env.step("11")
    assert (obs, reward, done, info["success"]) == ("correct\n", 1.0, True, True)


@pytest.mark.parametrize("target", [1, 8, 16])
def test_guess_number_every_guess_answers_by_comparison(target):
    for guess in range(1, 17):
        env = env_with_target(target)
        obs, reward, done, info = env.step(str(guess))
        expected = "higher\n" if guess < target else "lower\n" if guess > target else "correct\n"
        assert obs == expected
        assert reward == (1.0 if guess == target else 0.0) and done == (guess == target) == info["success"]


@pytest.mark.parametrize("text", ["abc", "17", "0", "", "3.5", "-1", "eight", "1 2", "+3", "٣"])
def test_guess_number_invalid_text_costs_penalty_and_keeps_state(text):
    env = env_with_target(3)
    obs, reward, done, info = env.step(text)
    assert (obs, reward, done, info["invalid"], info["success"]) == ("invalid\n", -0.1, False, True, False)
    assert env.target == 3 and env.oracle_action() == "8"  # consistent interval still 1..16


@pytest.mark.parametrize("text", [" 5 ", "5.", "5!", "05", "5\n"])
def test_guess_number_parsing_is_lenient(text):
    env = env_with_target(5)
    obs, reward, done, info = env.step(text)
    assert (obs, reward, done, info["invalid"]) == ("correct\n", 1.0, True, False)


def test_guess_number_ends_after_max_turns():
    env = env_with_target(16)
    outcomes = [env.step("1") for _ in range(5)]
    assert [o[2] for o in outcomes] == [False, False, False, False, True]
    assert outcomes[-1][3]["truncated"] and not outcomes[-1][3]["success"]
    assert sum(o[1] for o in outcomes) == 0.0


def test_guess_number_target_is_seeded_and_uniform():
    env = GuessNumber()
    targets = []
    for seed in range(1600):
        env.reset(seed)
        targets.append(env.target)
    env.reset(7)
    first = env.target
    env.reset(7)
    assert env.target == first
    counts = [targets.count(n) for n in range(1, 17)]
    assert min(counts) > 60 and max(counts) < 140  # expected 100 each


def test_guess_number_oracle_is_binary_search_and_wins_within_5_turns_for_every_target():
    for target in range(1, 17):
        env = env_with_target(target)
        guesses = []
        done = False
        while not done:
            guesses.append(env.oracle_action())
            obs, reward, done, info = env.step(guesses[-1])
        assert info["success"] and len(guesses) <= 5, (target, guesses)
        assert guesses[0] == "8"
    # Hand-traced worst case: 16 -> 8 (higher), 12 (higher), 14 (higher), 15 (higher), 16.
    env = env_with_target(16)
    trace = []
    for _ in range(5):
        trace.append(env.oracle_action())
        env.step(trace[-1])
    assert trace == ["8", "12", "14", "15", "16"]


def test_guess_number_oracle_uses_feedback_from_any_guess():
    env = env_with_target(6)
    env.step("3")   # higher -> 4..16
    env.step("zz")  # invalid, no information
    env.step("9")   # lower -> 4..8
    assert env.oracle_action() == "6"


def test_guess_number_random_policy_matches_closed_form():
    # Each turn a uniform guess hits with probability 1/16, independently: 1 - (15/16)^5 = 0.2758.
    result = evaluate_policy(EnvConfig(name="guess_number"), "random", episodes=2000, seed=0)
    assert abs(result["success_rate"] - (1 - (15 / 16) ** 5)) < 0.03
    oracle = evaluate_policy(EnvConfig(name="guess_number"), "oracle", episodes=500, seed=0)
    assert oracle["success_rate"] == 1.0


def test_guess_number_random_valid_action_is_uniform_over_choices():
    env = make_env(EnvConfig(name="guess_number"))
    rng = random.Random(0)
    draws = [env.random_valid_action(rng) for _ in range(3200)]
    assert set(draws) == set(env.action_choices())
    assert max(draws.count(c) for c in env.action_choices()) < 260  # expected 200
