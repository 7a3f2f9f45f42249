"""Cross-turn KV cache (HFEngine.open_dialogues / DialogueCache) against re-prefilling every turn.

The reference is the plain engine: every turn it prefills each whole dialogue. The cached path feeds
only what a dialogue gained since its last turn (right-aligned cached keys/values, left-padded new
tokens, so the mask has holes). Same tokens and log-probs are required under greedy decoding, under
sampling with one generator seed, with the action constraint, with episodes leaving the batch, and
with a context window that slides (those rows are prefilled again). float64 keeps ties from flipping.
"""
import random

import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.envs import BatchedEnvRunner, EnvConfig
from fastarcher.model import encode, stop_token_id
from fastarcher.rollout.base import ActionConstraint, SamplingParams
from fastarcher.rollout.collect import play_episodes
from fastarcher.rollout.hf_engine import HFEngine

PROMPTS = [[5, 17, 40, 99], [12], [7, 8, 9, 10, 11, 12, 13, 30, 31], [100, 101], [3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def model():
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3, max_positions=256)
    return policy


def engine_of(model, max_batch=256) -> HFEngine:
    return HFEngine(model, pad_id=0, device=torch.device("cpu"), max_batch=max_batch)


def run_dialogues(engine, params, *, cached: bool, turns=4, window=0, leave_after=None, seed=0):
    """Play `turns` turns on PROMPTS: each turn appends the utterance and a pseudo-observation of a
    row-dependent length (1..4 tokens). Returns per turn (keys, tokens, logprobs) and the reused count."""
    obs_rng = random.Random(7)
    gen = torch.Generator().manual_seed(seed)
    dialogues = {k: list(p) for k, p in enumerate(PROMPTS)}
    session = engine.open_dialogues(window) if cached else None
    history = []
    for t in range(turns):
        if leave_after is not None and t == leave_after:
            for k in (1, 3):  # two episodes end: the rest continue without re-padding to them
                dialogues.pop(k)
        keys = sorted(dialogues)
        prompts = [dialogues[k][-window:] if window else dialogues[k] for k in keys]
        if cached:
            session.keep_only(keys)
            out = session.generate(keys, prompts, params, gen)
            # Rows whose prompt fills the window are not kept: their next prompt slides.
            assert len(session) == sum(not window or len(p) < window for p in prompts)
        else:
            out = engine.generate(prompts, params, gen)
        history.append((keys, out.token_ids, out.logprobs))
        for k, toks in zip(keys, out.token_ids):
            obs = [obs_rng.randrange(20, 200) for _ in range(1 + (k + t) % 4)]
            dialogues[k] = dialogues[k] + toks + obs
    return history, (session.reused_tokens if cached else 0)


def assert_same(a, b):
    for (keys_a, toks_a, lps_a), (keys_b, toks_b, lps_b) in zip(a, b, strict=True):
        assert keys_a == keys_b
        assert toks_a == toks_b
        for x, y in zip(lps_a, lps_b):
            assert x == pytest.approx(y, abs=1e-9)


def test_greedy_cached_equals_reprefill_and_reuses_every_fed_token(model):
    params = SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=-1)  # never stops: 3 tokens each
    plain, _ = run_dialogues(engine_of(model), params, cached=False)
    cached, reused = run_dialogues(engine_of(model), params, cached=True)
    assert_same(plain, cached)
    # Turn t ≥ 1 reuses the whole previous prompt plus the 2 utterance tokens that were fed (no forward
    # runs after an utterance's last token).
    lengths = [len(p) for p in PROMPTS]
    expected = 0
    for t in range(1, 4):
        expected += sum(n + 2 for n in lengths)
        lengths = [n + 3 + 1 + (k + t - 1) % 4 for k, n in enumerate(lengths)]
    assert reused == expected


@pytest.mark.parametrize("max_batch", [256, 2])
def test_sampled_cached_equals_reprefill_with_stops_leavers_and_chunks(model, max_batch):
    # Stop on the token this model samples most, so that rows stop at different steps.
    probe, _ = run_dialogues(engine_of(model), SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=4,
                                                              stop_token_id=-1), cached=False, turns=5)
    sampled = [tok for _, turn, _ in probe for toks in turn for tok in toks]
    params = SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=4,
                            stop_token_id=max(set(sampled), key=sampled.count))
    plain, _ = run_dialogues(engine_of(model, max_batch), params, cached=False, turns=5, leave_after=2)
    cached, reused = run_dialogues(engine_of(model, max_batch), params, cached=True, turns=5, leave_after=2)
    assert_same(plain, cached)
    assert reused > 0
    assert any(len(toks) < 4 for _, turn, _ in plain for toks in turn)  # some rows stopped early


def test_constrained_cached_equals_reprefill(model):
    constraint = ActionConstraint([[30, 0], [31, 32, 0], [40, 0], [41, 42, 43, 0]], vocab_size=model.config.vocab_size)
    for greedy in (True, False):
        params = SamplingParams(greedy=greedy, max_new_tokens=5, stop_token_id=0, constraint=constraint)
        plain, _ = run_dialogues(engine_of(model), params, cached=False)
        cached, reused = run_dialogues(engine_of(model), params, cached=True)
        assert_same(plain, cached)
        assert reused > 0


def test_a_sliding_window_is_prefilled_again_and_stays_exact(model):
    params = SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=-1)
    plain, _ = run_dialogues(engine_of(model), params, cached=False, turns=4, window=12)
    cached, reused = run_dialogues(engine_of(model), params, cached=True, turns=4, window=12)
    assert_same(plain, cached)
    # Turn 1: rows still inside the window reuse their prefix; once every window slides, nothing does.
    assert 0 < reused
    _, reused_wide = run_dialogues(engine_of(model), params, cached=True, turns=4, window=1000)
    assert reused < reused_wide


def test_generate_refuses_mismatched_or_repeated_keys(model):
    session = engine_of(model).open_dialogues()
    params = SamplingParams(greedy=True, max_new_tokens=2, stop_token_id=-1)
    with pytest.raises(ValueError, match="one distinct key per prompt"):
        session.generate([0, 0], [[1, 2], [3]], params)
    with pytest.raises(ValueError, match="one distinct key per prompt"):
        session.generate([0], [[1, 2], [3]], params)


@pytest.mark.parametrize("env", ["guess_number", "frozenlake", "twenty_questions"])
def test_play_episodes_with_and_without_the_cache_play_the_same_episodes(env):
    model, tok = tiny_policy(torch.float32, seed=1, init_std=0.3, max_positions=1024)
    stop = stop_token_id(tok)
    cfg = EnvConfig(name=env)
    seeds = list(range(6))

    def play(kv_cache):
        runner = BatchedEnvRunner(cfg, len(seeds))
        constraint = ActionConstraint([encode(tok, a) + [stop] for a in runner.action_choices()], len(tok))
        params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_id=stop, constraint=constraint)
        engine = HFEngine(model, pad_id=tok.pad_token_id, device=torch.device("cpu"))
        return play_episodes(runner, seeds, tokenizer=tok, stop_id=stop, engine=engine, params=params,
                             generator=torch.Generator().manual_seed(3), kv_cache=kv_cache)

    plain, cached = play(False), play(True)
    assert [[(t.state, t.action) for t in e.turns] for e in plain.episodes] == \
        [[(t.state, t.action) for t in e.turns] for e in cached.episodes]
    assert plain.reused_tokens == 0
    assert max(len(e.turns) for e in plain.episodes) > 1
    # Every turn after the first reuses its whole previous state.
    assert cached.reused_tokens >= sum(len(t.state) for e in cached.episodes for t in e.turns[:-1])


def test_a_cache_that_does_not_keep_every_position_is_not_reused(model, monkeypatch):
    """Sliding-window or quantised layers (not plain DynamicLayer): rows are not stored, every turn is
    prefilled again, and the results stay those of the plain engine."""
    import fastarcher.rollout.hf_engine as hf_engine

    monkeypatch.setattr(hf_engine, "plain_layers", lambda cache: False)
    params = SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=-1)
    plain, _ = run_dialogues(engine_of(model), params, cached=False)
    engine = engine_of(model)
    session = engine.open_dialogues()
    out = session.generate([0, 1], [PROMPTS[0], PROMPTS[1]], params)
    assert len(session) == 0 and out.token_ids == [plain[0][1][0], plain[0][1][1]]


def test_plain_layers_accepts_the_engine_cache_and_refuses_a_sliding_one(model):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from fastarcher.kv_cache import plain_layers

    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    assert plain_layers(cache)
    assert not plain_layers(DynamicCache())
    cache.layers[0].__class__ = DynamicSlidingWindowLayer
    assert not plain_layers(cache)


def test_a_batch_that_continues_whole_uses_its_cache_without_a_copy(model, monkeypatch):
    """Every turn after the first, all rows continue the previous call's batch: that call's cache object
    is fed again (no gather, no copy). After episodes leave, the rest are selected by row."""
    import fastarcher.rollout.hf_engine as hf_engine

    seen = []
    real = hf_engine._prefix_cache

    def spy(prefixes, device):
        cache, mask = real(prefixes, device)
        block = hf_engine._shared_block(prefixes)
        seen.append("same" if block is not None and cache is block.cache else "copy")
        return cache, mask

    monkeypatch.setattr(hf_engine, "_prefix_cache", spy)
    params = SamplingParams(temperature=1.0, max_new_tokens=3, stop_token_id=-1)
    plain, _ = run_dialogues(engine_of(model), params, cached=False, turns=5, leave_after=3)
    cached, _ = run_dialogues(engine_of(model), params, cached=True, turns=5, leave_after=3)
    assert_same(plain, cached)
    # Turns 1 and 2 continue the whole batch; at turn 3 two episodes have left and the other three are
    # selected by row; turn 4 continues that batch.
    assert seen == ["same", "same", "copy", "same"]


@pytest.mark.parametrize("greedy", [True, False])
def test_repeated_prompts_are_prefilled_once_with_the_same_results(model, greedy):
    """share_prompts (group rollouts): each distinct prompt is prefilled once and its rows continue from
    its keys/values; tokens and log-probs equal the plain prefill's, under greedy and one sampling seed."""
    prompts = [PROMPTS[g] for g in (0, 2, 4) for _ in range(4)] + [PROMPTS[1]]
    engine = engine_of(model)
    prefill_rows = []

    def record(module, args, kwargs):
        prefill_rows.append(kwargs["input_ids"].shape)

    handle = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    out = {}
    try:
        for share in (False, True):
            prefill_rows.clear()
            params = SamplingParams(greedy=greedy, temperature=1.2, max_new_tokens=4, stop_token_id=-1,
                                    share_prompts=share)
            out[share] = (engine.generate(prompts, params, torch.Generator().manual_seed(11)), list(prefill_rows))
    finally:
        handle.remove()
    (plain, plain_calls), (shared, shared_calls) = out[False], out[True]
    assert shared.token_ids == plain.token_ids
    for x, y in zip(shared.logprobs, plain.logprobs):
        assert x == pytest.approx(y, abs=1e-9)
    assert plain_calls[0][0] == 13 and shared_calls[0][0] == 4  # 4 distinct prompts prefilled, not 13
    assert [s[0] for s in shared_calls[1:]] == [13] * 3  # then every row decodes
