"""HF rollout engine (fastarcher/rollout/hf_engine.py) against a step-by-step full re-forward without cache.

The reference decodes one prompt at a time: unpadded forward of prompt ⊕ tokens so far, last logits,
constraint mask, temperature, top-p, log_softmax. Batching, left padding, the KV cache and chunking must
not change any token or log-prob. The model is float64 so argmax ties cannot flip between paths.
"""
import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.rollout.base import ActionConstraint, SamplingParams
from fastarcher.rollout.hf_engine import HFEngine, top_p_filter

torch.manual_seed(0)

PROMPTS = [[5, 17, 40, 99], [12], [7, 8, 9, 10, 11, 12, 13, 30, 31], [100, 101], [3, 4, 5, 6, 7, 8]]
"""Different lengths (1..9) so the batch is left-padded."""


@pytest.fixture(scope="module")
def model():
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    return policy


def make_engine(model, max_batch: int = 256) -> HFEngine:
    return HFEngine(model, pad_id=0, device=torch.device("cpu"), max_batch=max_batch)


@torch.no_grad()
def reference_decode(model, prompt, params: SamplingParams, forced: list[int] | None = None):
    """Greedy (or scoring of `forced` tokens) by full re-forward; returns (tokens, logprobs)."""
    tokens, logprobs = [], []
    for step in range(params.max_new_tokens):
        logits = model(input_ids=torch.tensor([prompt + tokens]), use_cache=False).logits[0, -1].double()  # (V,)
        if params.constraint is not None:
            logits = logits.masked_fill(~params.constraint.mask(tuple(tokens)), float("-inf"))
        if not params.greedy:
            logits = top_p_filter((logits / params.temperature)[None], params.top_p)[0]
        logp = torch.log_softmax(logits, -1)
        tok = int(logp.argmax()) if forced is None else forced[step]
        tokens.append(tok)
        logprobs.append(float(logp[tok]))
        if tok == params.stop_token_id or (forced is not None and step + 1 == len(forced)):
            break
    return tokens, logprobs


def test_greedy_batched_left_padded_equals_unbatched_full_reforward(model):
    params = SamplingParams(greedy=True, max_new_tokens=6, stop_token_id=-1)  # never stops early
    out = make_engine(model).generate(PROMPTS, params)
    for prompt, tokens, logprobs in zip(PROMPTS, out.token_ids, out.logprobs):
        ref_tokens, ref_logprobs = reference_decode(model, prompt, params)
        assert tokens == ref_tokens, prompt
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-5)
        assert len(tokens) == 6
    # Without an early stop: one prefill plus one forward per further token (none after the last).
    assert out.num_calls == 1 + 5


@torch.no_grad()
def test_the_model_is_sensitive_to_context_and_padding(model):
    # Guards the tests above: greedy continuations depend on the whole prompt (not only the last token),
    # and attending to left padding would change the logits, so a masking bug cannot pass unseen.
    out = make_engine(model).generate(PROMPTS, SamplingParams(greedy=True, max_new_tokens=4, stop_token_id=-1))
    assert all(len(set(t)) > 1 for t in out.token_ids)
    short = torch.tensor([[0, 0, 0] + PROMPTS[1]])
    masked = model(input_ids=short, attention_mask=torch.tensor([[0, 0, 0, 1]])).logits[0, -1]
    unmasked = model(input_ids=short).logits[0, -1]
    alone = model(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1]
    assert torch.allclose(masked, alone, atol=1e-10)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_stop_token_ends_each_row_and_other_rows_continue(model):
    free = SamplingParams(greedy=True, max_new_tokens=6, stop_token_id=-1)
    ref = [reference_decode(model, p, free)[0] for p in PROMPTS]
    # Stop at a token that row 0 emits at step k (its first occurrence) and that another row never emits early.
    stop, k = next((tok, i) for i, tok in enumerate(ref[0]) if i >= 1 and tok not in ref[0][:i])
    params = SamplingParams(greedy=True, max_new_tokens=6, stop_token_id=stop)
    out = make_engine(model).generate(PROMPTS, params)
    for prompt, full, tokens in zip(PROMPTS, ref, out.token_ids):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert tokens == expected, (prompt, full, tokens)
    assert out.token_ids[0] == ref[0][: k + 1] and out.token_ids[0][-1] == stop
    assert any(stop not in r for r in ref), "choose a stop token that some row never emits"


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_max_batch_chunking_gives_the_same_greedy_outputs(model, max_batch):
    params = SamplingParams(greedy=True, max_new_tokens=5, stop_token_id=-1)
    whole = make_engine(model, 256).generate(PROMPTS, params)
    chunked = make_engine(model, max_batch).generate(PROMPTS, params)
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(chunked.logprobs, whole.logprobs):
        assert a == pytest.approx(b, abs=1e-6)
    chunks = -(-len(PROMPTS) // max_batch)
    assert chunked.num_calls == chunks * 5


def constraint_and_actions(stop: int, vocab: int):
    # Shared prefixes and different lengths: (10,) may continue with 11, 12 or stop.
    actions = [[10, 11, stop], [10, 12, 13, stop], [20, stop], [10, stop]]
    return ActionConstraint(actions, vocab), actions


def test_constraint_masks_by_hand():
    c, _ = constraint_and_actions(stop=50, vocab=60)
    assert c.mask(()).nonzero().flatten().tolist() == [10, 20]
    assert c.mask((10,)).nonzero().flatten().tolist() == [11, 12, 50]
    assert c.mask((10, 12)).nonzero().flatten().tolist() == [13]
    assert c.mask((10, 11, 50)).all()  # past the table: anything (the engine has stopped by then)
    assert c.max_len == 4  # the longest action, stop token included
    masks = c.masks_for(torch.tensor([[10, 12, 13, 50], [20, 50, 0, 0]]), torch.tensor([4, 2]))
    assert masks.shape == (2, 4, 60)
    assert torch.equal(masks[0, 2], c.mask((10, 12))) and torch.equal(masks[1, 1], c.mask((20,)))
    assert masks[1, 2:].all()  # padding positions allow everything
    with pytest.raises(ValueError):
        ActionConstraint([[1, 2], []], 10)


def test_constrained_sampling_only_produces_allowed_actions(model):
    stop = 50
    constraint, actions = constraint_and_actions(stop, model.config.vocab_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_id=stop, constraint=constraint)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(200)]
    out = make_engine(model).generate(prompts, params, torch.Generator().manual_seed(0))
    seen = {tuple(t) for t in out.token_ids}
    assert seen <= {tuple(a) for a in actions}, seen
    assert seen == {tuple(a) for a in actions}  # near-uniform random model: every action gets sampled


def test_constrained_greedy_picks_the_best_allowed_action(model):
    stop = 50
    constraint, actions = constraint_and_actions(stop, model.config.vocab_size)
    params = SamplingParams(greedy=True, max_new_tokens=8, stop_token_id=stop, constraint=constraint)
    out = make_engine(model).generate(PROMPTS, params)
    for prompt, tokens, logprobs in zip(PROMPTS, out.token_ids, out.logprobs):
        ref_tokens, ref_logprobs = reference_decode(model, prompt, params)
        assert tokens == ref_tokens and tokens in actions
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_sampled_logprobs_equal_independent_log_softmax_of_full_forward(model, temperature, top_p):
    stop = 50
    constraint, _ = constraint_and_actions(stop, model.config.vocab_size)
    for constrained in (constraint, None):
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=4, stop_token_id=stop,
                                constraint=constrained)
        out = make_engine(model).generate(PROMPTS, params, torch.Generator().manual_seed(1))
        for prompt, tokens, logprobs in zip(PROMPTS, out.token_ids, out.logprobs):
            _, ref = reference_decode(model, prompt, params, forced=tokens)
            assert len(logprobs) == len(tokens) > 0
            assert all(lp > float("-inf") for lp in logprobs)  # never samples a filtered token
            assert logprobs == pytest.approx(ref, abs=1e-5)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, stop_token_id=-1)
    engine = make_engine(model, max_batch=2)
    a = engine.generate(PROMPTS, params, torch.Generator().manual_seed(123))
    b = engine.generate(PROMPTS, params, torch.Generator().manual_seed(123))
    c = engine.generate(PROMPTS, params, torch.Generator().manual_seed(124))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_output_order_follows_the_input_not_the_length_sort(model):
    params = SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=-1)
    engine = make_engine(model)
    forward = engine.generate(PROMPTS, params).token_ids
    backward = engine.generate(PROMPTS[::-1], params).token_ids
    assert backward == forward[::-1]


def test_engine_parameters_are_frozen(model):
    engine = make_engine(model)
    assert all(not p.requires_grad for p in engine.model.parameters())
    assert not engine.model.training


# ---------------------------------------------------------------- top-p filter


def test_top_p_filter_by_hand():
    # probs 0.05, 0.5, 0.15, 0.3 (unsorted on purpose). Sorted: 0.5, 0.3, 0.15, 0.05; mass before each
    # token: 0, 0.5, 0.8, 0.95. A token is dropped when the mass before it already reaches top_p.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.6) == [False, True, False, True]     # 0.5 < 0.6 → keep the 0.3 token too
    assert kept(0.85) == [False, True, True, True]     # 0.8 < 0.85 → keep 0.15
    assert kept(0.99) == [True, True, True, True]
    assert kept(0.1) == [False, True, False, False]    # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    kept_logits = top_p_filter(logits, 0.6)
    assert torch.equal(kept_logits[0, [1, 3]], logits[0, [1, 3]])  # kept values untouched


def test_top_p_filter_rows_are_independent_and_respect_existing_masks():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, float("-inf"), 0.0]])  # (B, V)
    out = top_p_filter(logits, 0.5)
    # Row 0: uniform, mass before the 2nd and 3rd token 0.25, 0.5 → keep 2 tokens.
    assert torch.isfinite(out[0]).sum() == 2
    # Row 1: p(4.0) ≈ 0.96 ≥ 0.5 → only the top token.
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]
