"""Utterance log-probs (fastarcher/policy.py) against a naive per-row reference: unpadded forward of s ⊕ a,
log_softmax (after the constraint mask), gather, sum — values, token entropies and gradients.
"""
import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.policy import action_logprobs, left_align
from fastarcher.rollout.base import ActionConstraint

torch.manual_seed(0)

PAD, STOP = 0, 50
STATES = [[5, 17, 40], [12, 13, 14, 15, 16, 17, 18], [9], [100, 101, 102, 103, 104]]
ACTIONS = [[10, 11, STOP], [20, STOP], [10, 12, 13, STOP], [10, STOP]]
"""Different state lengths (1..7) and action lengths (2..4) in one batch; every action is allowed below."""


@pytest.fixture(scope="module")
def model():
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    return policy


def right_pad(rows, width, garbage: int):
    """Right-pad with a non-pad token: padding content must never matter."""
    ids = torch.full((len(rows), width), garbage, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def batch():
    state_ids, state_len = right_pad(STATES, 9, garbage=77)  # wider than the longest state
    action_ids, action_len = right_pad(ACTIONS, 5, garbage=88)
    return state_ids, state_len, action_ids, action_len


def naive(model, constraint=None):
    """Per row: (sum of log-probs, token log-probs, token entropies), no padding anywhere."""
    out = []
    for s, a in zip(STATES, ACTIONS):
        logits = model(input_ids=torch.tensor([s + a]), use_cache=False).logits[0]  # (S + A, V)
        logits = logits[len(s) - 1 : len(s) - 1 + len(a)]  # (A, V): position S-1+h predicts a[h]
        if constraint is not None:
            allowed = torch.stack([constraint.mask(tuple(a[:h])) for h in range(len(a))])
            logits = logits.masked_fill(~allowed, float("-inf"))
        logp = torch.log_softmax(logits, -1)
        token_logp = logp.gather(-1, torch.tensor(a)[:, None]).squeeze(-1)
        # Masked entries have p = 0 and contribute 0 (filled before the product: no 0 · -inf in backward).
        entropy = -(logp.exp() * logp.masked_fill(~logp.isfinite(), 0.0)).sum(-1)
        out.append((token_logp.sum(), token_logp, entropy))
    return out


def test_left_align_by_hand():
    ids = torch.tensor([[1, 2, 3, 9], [4, 9, 9, 9], [5, 6, 7, 8]])
    lengths = torch.tensor([3, 1, 4])
    assert left_align(ids, lengths, pad_id=0).tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [5, 6, 7, 8]]
    assert left_align(ids[:, :0], torch.tensor([0, 0, 0]), pad_id=0).shape == (3, 0)


@pytest.mark.parametrize("backend", ["auto", "eager", "torch_chunked"])
@pytest.mark.parametrize("constrained", [False, True])
def test_logprobs_and_entropy_equal_the_naive_per_row_computation(model, backend, constrained):
    constraint = ActionConstraint(ACTIONS, model.config.vocab_size) if constrained else None
    state_ids, state_len, action_ids, action_len = batch()
    with torch.no_grad():
        logp_sum, entropy, mask = action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD,
                                                  constraint=constraint, backend=backend)
        ref = naive(model, constraint)
    assert logp_sum.shape == (4,) and entropy.shape == mask.shape == (4, 5)
    assert mask.tolist() == [[h < len(a) for h in range(5)] for a in ACTIONS]
    for b, (ref_sum, _, ref_entropy) in enumerate(ref):
        n = len(ACTIONS[b])
        assert logp_sum[b].item() == pytest.approx(ref_sum.item(), abs=1e-9)
        assert torch.allclose(entropy[b, :n], ref_entropy, atol=1e-9)
    assert (entropy[~mask] == 0).all()  # padding positions carry no entropy


def test_constraint_raises_logprobs_and_lowers_entropy(model):
    # The constrained distribution renormalises over the allowed tokens: every log-prob goes up.
    state_ids, state_len, action_ids, action_len = batch()
    constraint = ActionConstraint(ACTIONS, model.config.vocab_size)
    with torch.no_grad():
        free, free_entropy, mask = action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD)
        constrained, entropy, _ = action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD,
                                                  constraint=constraint)
    assert (constrained > free).all()
    assert (entropy[mask] < free_entropy[mask]).all()
    # After "10" the allowed set is {11, 12, STOP}: entropy at most log 3; after "10 12" only 13: entropy 0.
    assert entropy[0, 1] <= torch.log(torch.tensor(3.0)) + 1e-9
    assert entropy[2, 2] == 0


def test_gradients_flow_and_equal_the_naive_gradients(model):
    constraint = ActionConstraint(ACTIONS, model.config.vocab_size)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # like advantages

    model.zero_grad()
    logp_sum, entropy, mask = action_logprobs(model, *batch(), pad_id=PAD, constraint=constraint)
    ((weights * logp_sum).sum() + 0.1 * entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    ref = naive(model, constraint)
    loss = sum(w * s for w, (s, _, _) in zip(weights, ref)) + 0.1 * sum(e.sum() for _, _, e in ref)
    loss.backward()
    for name, p in model.named_parameters():
        assert grads[name].abs().sum() > 0, name
        assert torch.allclose(grads[name], p.grad, atol=1e-9, rtol=1e-7), name
    model.zero_grad()


def test_result_does_not_depend_on_padding_width(model):
    state_ids, state_len, action_ids, action_len = batch()
    with torch.no_grad():
        a, _, _ = action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD)
        wide_s = torch.cat([state_ids, torch.full((4, 6), 3)], dim=1)
        wide_a = torch.cat([action_ids, torch.full((4, 3), 3)], dim=1)
        b, entropy, mask = action_logprobs(model, wide_s, state_len, wide_a, action_len, pad_id=PAD)
    assert torch.allclose(a, b, atol=1e-10)
    assert mask.shape == (4, 8) and (entropy[:, 5:] == 0).all()
