"""BatchedEnvRunner (fastarcher/envs/runner.py): lockstep stepping, episode statistics, broken envs."""
import logging
import math
import random

import pytest
import torch

from fastarcher.envs import BatchedEnvRunner, EnvConfig, GuessNumber, make_env

torch.manual_seed(0)

GUESS = EnvConfig(name="guess_number")


def target_of(seed: int) -> int:
    env = GuessNumber()
    env.reset(seed)
    return env.target


def test_reset_returns_the_same_prompts_as_single_envs():
    cfg = EnvConfig(name="sokoban")
    runner = BatchedEnvRunner(cfg, 4)
    prompts = runner.reset([3, 1, 4, 1])
    assert prompts == [make_env(cfg).reset(s) for s in (3, 1, 4, 1)]
    assert runner.live_indices() == [0, 1, 2, 3]
    assert runner.max_turns == 20 and runner.action_choices() == ["up", "down", "left", "right"]


def test_step_matches_single_env_and_tracks_hand_computed_stats():
    runner = BatchedEnvRunner(GUESS, 3)
    seeds = [10, 11, 12]
    runner.reset(seeds)
    t0, t1, t2 = (target_of(s) for s in seeds)
    wrong = lambda t: str(1 if t != 1 else 2)  # noqa: E731
    # Turn 1: env 0 wins at once, env 1 sends garbage, env 2 guesses wrong.
    results = runner.step([str(t0), "what?", wrong(t2)])
    assert [r.index for r in results] == [0, 1, 2]
    assert (results[0].obs, results[0].reward, results[0].done, results[0].info["success"]) == ("correct\n", 1.0, True, True)
    assert (results[1].obs, results[1].reward, results[1].info["invalid"]) == ("invalid\n", -0.1, True)
    assert runner.live_indices() == [1, 2]
    # Turn 2 by dict, only env 1: it wins; env 2 is not stepped.
    results = runner.step({1: str(t1)})
    assert [r.index for r in results] == [1] and results[0].done
    assert runner.live_indices() == [2]
    # Env 2 keeps guessing wrong until max_turns (5).
    for _ in range(4):
        runner.step([wrong(t2)])
    assert runner.live_indices() == []
    stats = runner.stats
    assert [(s.episode_return, s.length, s.success, s.invalid_count) for s in stats] == [
        (1.0, 1, True, 0),
        (pytest.approx(0.9), 2, True, 1),
        (0.0, 5, False, 0),
    ]
    summary = runner.summary()
    assert summary["return_mean"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert summary["success_rate"] == pytest.approx(2 / 3)
    assert summary["length_mean"] == pytest.approx(8 / 3)
    assert summary["invalid_rate"] == pytest.approx(1 / 8)
    assert (summary["num_episodes"], summary["num_dropped"]) == (3.0, 0.0)


def test_episode_counter_and_seeds_recorded_across_resets():
    runner = BatchedEnvRunner(GUESS, 2)
    runner.reset([5, 6])
    runner.reset([7, 8])
    assert [(s.seed, s.episode) for s in runner.stats] == [(7, 2), (8, 3)]


def test_bad_calls_raise_value_errors():
    with pytest.raises(ValueError, match="num_envs"):
        BatchedEnvRunner(GUESS, 0)
    runner = BatchedEnvRunner(GUESS, 2)
    with pytest.raises(ValueError, match=r"got 1 seeds for num_envs \(2\)"):
        runner.reset([1])
    runner.reset([1, 2])
    with pytest.raises(ValueError, match="1 actions for 2 live envs"):
        runner.step(["3"])
    runner.step({0: str(target_of(1))})
    with pytest.raises(ValueError, match=r"slots \[0\] that are not live"):
        runner.step({0: "3"})


class _Boom(RuntimeError):
    pass


def test_env_raising_in_step_is_dropped_logged_and_batch_continues(caplog, monkeypatch):
    runner = BatchedEnvRunner(GUESS, 3)
    runner.reset([20, 21, 22])

    def broken_step(action_text):
        raise _Boom("simulated env failure")

    monkeypatch.setattr(runner.envs[1], "step", broken_step)
    with caplog.at_level(logging.WARNING, logger="fastarcher.envs.runner"):
        results = runner.step(["1", "1", "1"])
    assert [r.dropped for r in results] == [False, True, False]
    assert results[1].done and results[1].obs == "" and results[1].info["dropped"] is True
    assert "simulated env failure" in results[1].info["error"]
    message = caplog.records[-1].getMessage()
    assert "guess_number" in message and "seed 21" in message and "episode 1" in message and "step" in message
    assert 1 not in runner.live_indices()
    while runner.live_indices():  # the other two finish normally
        runner.step(["1"] * len(runner.live_indices()))
    summary = runner.summary()
    assert (summary["num_episodes"], summary["num_dropped"]) == (2.0, 1.0)
    assert summary["length_mean"] == pytest.approx(sum(runner.stats[i].length for i in (0, 2)) / 2)


def test_env_raising_in_reset_is_dropped_and_never_live(caplog, monkeypatch):
    runner = BatchedEnvRunner(GUESS, 2)

    def broken_reset(seed):
        raise _Boom("no room")

    monkeypatch.setattr(runner.envs[0], "reset", broken_reset)
    with caplog.at_level(logging.WARNING, logger="fastarcher.envs.runner"):
        prompts = runner.reset([30, 31])
    assert prompts[0] == "" and prompts[1].startswith("Guess")
    assert runner.live_indices() == [1] and runner.stats[0].dropped
    assert "seed 30" in caplog.records[-1].getMessage() and "reset" in caplog.records[-1].getMessage()


def test_summary_of_empty_batch_is_nan():
    runner = BatchedEnvRunner(GUESS, 2)
    runner.reset([0, 1])
    summary = runner.summary()
    assert math.isnan(summary["return_mean"]) and summary["num_episodes"] == 0.0


def test_oracle_and_random_actions_are_aligned_with_live_slots():
    cfg = EnvConfig(name="frozenlake")
    runner = BatchedEnvRunner(cfg, 8)
    runner.reset(list(range(8)))
    rng = random.Random(0)
    runner.step(runner.random_actions(rng))  # some may fall into holes
    live = runner.live_indices()
    oracle = runner.oracle_actions()
    assert len(oracle) == len(live)
    assert oracle == [runner.envs[i].oracle_action() for i in live]
    while runner.live_indices():
        runner.step(runner.oracle_actions())
    assert all(s.success for s in runner.stats if s.index in live)


@pytest.mark.parametrize("name", ["guess_number", "twenty_questions", "frozenlake", "sokoban"])
def test_runner_oracle_batch_succeeds_everywhere(name):
    runner = BatchedEnvRunner(EnvConfig(name=name), 16)
    runner.reset(list(range(100, 116)))
    while runner.live_indices():
        runner.step(runner.oracle_actions())
    assert runner.summary()["success_rate"] == 1.0
