"""Episode collection (fastarcher/rollout/collect.py): s' = s ⊕ a ⊕ o, Monte-Carlo returns by hand,
dropped episodes excluded, engine-driven play with the action constraint.
"""
import random

import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.envs import BatchedEnvRunner, EnvConfig, make_env
from fastarcher.model import encode, stop_token_id
from fastarcher.rollout.base import ActionConstraint, SamplingParams
from fastarcher.rollout.collect import Episode, Turn, oracle_picker, play_episodes, random_picker
from fastarcher.rollout.hf_engine import HFEngine

torch.manual_seed(0)

GUESS = EnvConfig(name="guess_number")
SEEDS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def tok():
    return tiny_policy(torch.float32)[1]


def play(tok, picker, seeds=SEEDS, cfg=GUESS):
    runner = BatchedEnvRunner(cfg, len(seeds))
    return play_episodes(runner, seeds, tokenizer=tok, stop_id=stop_token_id(tok), picker=picker)


def rows(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [r[:n] for r, n in zip(ids.tolist(), lengths.tolist())]


def turn(reward: float) -> Turn:
    return Turn(state=[1], action=[2], obs=[3], reward=reward, done=False, invalid=False)


def test_mc_returns_by_hand():
    episode = Episode(seed=0, turns=[turn(-0.1), turn(0.0), turn(1.0)])
    # G2 = 1;  G1 = 0 + 0.9·1 = 0.9;  G0 = -0.1 + 0.9·0.9 = 0.71
    assert episode.mc_returns(0.9) == pytest.approx([0.71, 0.9, 1.0])
    assert episode.mc_returns(0.0) == pytest.approx([-0.1, 0.0, 1.0])
    assert episode.mc_returns(1.0) == pytest.approx([0.9, 1.0, 1.0])
    assert episode.total_reward == pytest.approx(0.9)


@pytest.mark.parametrize("picker_name", ["oracle", "random"])
def test_next_state_is_state_action_observation_and_the_next_turns_state(tok, picker_name):
    picker = oracle_picker if picker_name == "oracle" else random_picker(random.Random(0))
    result = play(tok, picker)
    batch = result.transitions(gamma=0.9, pad_id=tok.pad_token_id)
    states = rows(batch.state_ids, batch.state_len)
    actions = rows(batch.action_ids, batch.action_len)
    observations = rows(batch.next_obs_ids, batch.next_obs_len)
    next_states = rows(*batch.next_state(max_len=10_000))
    r = 0
    for episode in result.kept():
        for t, step in enumerate(episode.turns):
            assert next_states[r] == states[r] + actions[r] + observations[r]
            if t + 1 < len(episode.turns):
                assert next_states[r] == states[r + 1]  # s'_t is exactly s_{t+1}
                assert batch.done[r] == 0
            else:
                assert batch.done[r] == 1
            assert actions[r][-1] == stop_token_id(tok)
            r += 1
    assert r == len(batch) == sum(len(e.turns) for e in result.episodes)


def test_states_decode_to_the_dialogue_text_replayed_independently(tok):
    result = play(tok, random_picker(random.Random(3)))
    for episode in result.kept():
        env = make_env(GUESS)
        text = env.reset(episode.seed)
        for step in episode.turns:
            assert tok.decode(step.state) == text
            action = tok.decode(step.action[:-1])
            obs, reward, done, info = env.step(action)
            assert (tok.decode(step.obs), step.reward, step.done) == (obs, reward, done)
            text += action + "\n" + obs
        assert done


def test_oracle_episodes_succeed_with_returns_gamma_powers(tok):
    gamma = 0.9
    result = play(tok, oracle_picker)
    batch = result.transitions(gamma=gamma, pad_id=tok.pad_token_id)
    r = 0
    for episode in result.kept():
        length = len(episode.turns)
        assert episode.success and 1 <= length <= 5
        for t in range(length):
            # Reward 1 only on the last (correct) guess: G_t = γ^(L-1-t).
            assert batch.mc_return[r].item() == pytest.approx(gamma ** (length - 1 - t), rel=1e-6)
            assert batch.reward[r].item() == (1.0 if t == length - 1 else 0.0)
            r += 1
    stats = result.stats("rollout")
    assert stats["rollout/success_rate"] == 1.0 and stats["rollout/invalid_rate"] == 0.0
    assert stats["count/rollout_episodes"] == len(SEEDS) and stats["count/rollout_dropped"] == 0.0


def test_random_picker_returns_match_the_rewards_and_are_reproducible(tok):
    gamma = 0.8
    a = play(tok, random_picker(random.Random(7)))
    b = play(tok, random_picker(random.Random(7)))
    assert [[t.action for t in e.turns] for e in a.episodes] == [[t.action for t in e.turns] for e in b.episodes]
    batch = a.transitions(gamma=gamma, pad_id=tok.pad_token_id)
    r = 0
    for episode in a.kept():
        rewards = [t.reward for t in episode.turns]
        for t in range(len(rewards)):
            expected = sum(gamma**k * rewards[t + k] for k in range(len(rewards) - t))
            assert batch.mc_return[r].item() == pytest.approx(expected, abs=1e-6)
            r += 1
    stats = a.stats("rollout")
    assert stats["rollout/return_mean"] == pytest.approx(sum(e.total_reward for e in a.kept()) / len(SEEDS))


def test_episodes_whose_env_raises_are_excluded(tok):
    runner = BatchedEnvRunner(GUESS, len(SEEDS))
    # Slot 2 raises on its second step, slot 4 on reset.
    real_step, calls = runner.envs[2].step, []

    def flaky_step(action):
        calls.append(action)
        if len(calls) == 2:
            raise RuntimeError("env crashed")
        return real_step(action)

    def broken_reset(seed):
        raise RuntimeError("cannot reset")

    runner.envs[2].step = flaky_step
    runner.envs[4].reset = broken_reset
    wrong = lambda runner, live: ["1" if runner.envs[i].target != 1 else "2" for i in live]  # noqa: E731
    result = play_episodes(runner, SEEDS, tokenizer=tok, stop_id=stop_token_id(tok), picker=wrong)
    assert [e.dropped for e in result.episodes] == [False, False, True, False, True, False]
    assert [e.seed for e in result.kept()] == [0, 1, 3, 5]
    batch = result.transitions(gamma=0.9, pad_id=tok.pad_token_id)
    assert len(batch) == sum(len(e.turns) for e in result.kept()) == 4 * 5  # always wrong: 5 turns each
    stats = result.stats("rollout")
    assert stats["count/rollout_dropped"] == 2.0 and stats["count/rollout_episodes"] == 4.0
    assert stats["rollout/episode_len"] == 5.0


def test_play_with_engine_and_constraint_gives_only_valid_actions(tok):
    model, _ = tiny_policy(torch.float32, seed=1)
    stop = stop_token_id(tok)
    runner = BatchedEnvRunner(GUESS, len(SEEDS))
    constraint = ActionConstraint([encode(tok, a) + [stop] for a in runner.action_choices()], len(tok))
    engine = HFEngine(model, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    params = SamplingParams(temperature=1.0, max_new_tokens=4, stop_token_id=stop, constraint=constraint)
    result = play_episodes(runner, SEEDS, tokenizer=tok, stop_id=stop, engine=engine, params=params,
                           generator=torch.Generator().manual_seed(0))
    assert result.stats("rollout")["rollout/invalid_rate"] == 0.0
    turns = [t for e in result.kept() for t in e.turns]
    assert all(len(t.action) == 2 and t.action[-1] == stop for t in turns)  # one number token + stop
    assert result.generated_tokens == 2 * len(turns)
    assert result.engine_calls > 0
    batch = result.transitions(gamma=1.0, pad_id=tok.pad_token_id)
    next_states = rows(*batch.next_state(max_len=10_000))
    states = rows(batch.state_ids, batch.state_len)
    r = 0
    for episode in result.kept():
        for t in range(len(episode.turns) - 1):
            assert next_states[r + t] == states[r + t + 1]
        r += len(episode.turns)


def test_unfinished_engine_utterances_are_closed_with_the_stop_token(tok):
    model, _ = tiny_policy(torch.float32, seed=1, init_std=0.3)  # does not just echo the last newline
    stop = stop_token_id(tok)
    runner = BatchedEnvRunner(GUESS, 2)
    engine = HFEngine(model, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    params = SamplingParams(greedy=True, max_new_tokens=2, stop_token_id=stop)  # unconstrained, short
    result = play_episodes(runner, [0, 1], tokenizer=tok, stop_id=stop, engine=engine, params=params)
    actions = [step.action for episode in result.kept() for step in episode.turns]
    assert all(a[-1] == stop and a.count(stop) == 1 and len(a) <= 3 for a in actions)
    assert any(len(a) == 3 for a in actions)  # some utterance was cut at 2 tokens and closed


def test_play_needs_exactly_one_of_engine_or_picker(tok):
    runner = BatchedEnvRunner(GUESS, 1)
    with pytest.raises(ValueError, match="exactly one"):
        play_episodes(runner, [0], tokenizer=tok, stop_id=stop_token_id(tok))


def test_context_window_keeps_the_last_tokens_and_next_state_stays_exact(tok):
    window = 7
    full = play(tok, random_picker(random.Random(5)))
    runner = BatchedEnvRunner(GUESS, len(SEEDS))
    windowed = play_episodes(runner, SEEDS, tokenizer=tok, stop_id=stop_token_id(tok),
                             picker=random_picker(random.Random(5)), context_tokens=window)
    batch = windowed.transitions(gamma=0.9, pad_id=tok.pad_token_id)
    states = rows(batch.state_ids, batch.state_len)
    next_states = rows(*batch.next_state(max_len=window))
    r = 0
    assert any(len(t.state) > window for e in full.kept() for t in e.turns)  # the window does cut
    for e_full, e_win in zip(full.kept(), windowed.kept()):
        assert len(e_full.turns) == len(e_win.turns)
        for t, (step_full, step_win) in enumerate(zip(e_full.turns, e_win.turns)):
            assert step_win.state == step_full.state[-window:]  # the tail of the whole dialogue
            assert len(states[r]) <= window
            if t + 1 < len(e_win.turns):
                assert next_states[r] == states[r + 1]  # s′ rebuilt from the window is the next state
            r += 1
    assert r == len(batch)


def test_context_window_must_not_be_negative(tok):
    runner = BatchedEnvRunner(GUESS, 1)
    with pytest.raises(ValueError, match="context_tokens"):
        play_episodes(runner, [0], tokenizer=tok, stop_id=stop_token_id(tok), picker=oracle_picker, context_tokens=-1)


def test_sampled_lengths_undo_only_the_stop_token_that_closed_a_cut_utterance():
    from fastarcher.rollout.collect import close_utterance, pad_rows, sampled_lengths

    stop, max_new = 2, 4
    # the engine stops at the stop token or after max_new_tokens: cut, full length, short, stop only
    sampled = [[5, 6, 7, 8], [5, 6, 7, stop], [5, stop], [stop]]
    closed = [close_utterance(list(u), stop) for u in sampled]
    assert [len(c) for c in closed] == [5, 4, 2, 1]  # the cut one (4 tokens, no stop) got a stop appended
    _, closed_len = pad_rows(closed, 0)
    assert sampled_lengths(closed_len, max_new).tolist() == [len(u) for u in sampled]
