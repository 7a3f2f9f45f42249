"""Utterance log-probs (fastarcher/policy.py) against a naive per-row reference: unpadded forward of s ⊕ a,
log_softmax (after the constraint mask), gather, sum — values, token entropies and gradients.
"""
import pytest
import torch

from dist_helpers import dist_check_results, tiny_policy
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


def test_unconstrained_scoring_fuses_the_head_and_equals_the_logits_path(model, monkeypatch):
    """Without a constraint the LM head is fused with the log-prob (no (B, A, V) logits); values and
    gradients equal fused_head=False, and the naive reference."""
    import fastarcher.policy as policy_module

    calls = []
    real = policy_module.linear_token_logprobs_and_entropy
    monkeypatch.setattr(policy_module, "linear_token_logprobs_and_entropy",
                        lambda hidden, *a, **k: calls.append(hidden.shape) or real(hidden, *a, **k))
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    results = {}
    for fused in (True, False):
        model.zero_grad()
        logp_sum, entropy, mask = action_logprobs(model, *batch(), pad_id=PAD, fused_head=fused)
        ((weights * logp_sum).sum() + 0.1 * entropy.sum()).backward()
        results[fused] = (logp_sum.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    assert calls == [(4, 6, model.config.hidden_size)]  # once, on the A + 1 kept positions
    assert isinstance(model.lm_head, torch.nn.Linear)  # the real head is back
    (fused_sum, fused_entropy, fused_grads), (sum_, entropy_, grads) = results[True], results[False]
    assert torch.allclose(fused_sum, sum_, atol=1e-10) and torch.allclose(fused_entropy, entropy_, atol=1e-10)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(fused_grads[name], grad, atol=1e-10, rtol=1e-8), name
    for b, (ref_sum, _, _) in enumerate(naive(model)):
        assert fused_sum[b].item() == pytest.approx(ref_sum.item(), abs=1e-9)


def test_a_hooked_head_or_a_constraint_keeps_the_logits_path(model, monkeypatch):
    import fastarcher.policy as policy_module

    monkeypatch.setattr(policy_module, "linear_token_logprobs_and_entropy",
                        lambda *a, **k: pytest.fail("the fused path ran"))
    constraint = ActionConstraint(ACTIONS, model.config.vocab_size)
    with torch.no_grad():
        action_logprobs(model, *batch(), pad_id=PAD, constraint=constraint)
        handle = model.lm_head.register_forward_hook(lambda *args: None)  # e.g. a trace on the head
        try:
            action_logprobs(model, *batch(), pad_id=PAD)
        finally:
            handle.remove()


def test_the_real_head_is_restored_when_the_forward_fails(model, monkeypatch):
    import fastarcher.policy as policy_module

    def boom(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(policy_module, "linear_token_logprobs_and_entropy", boom)
    head = model.lm_head
    with pytest.raises(RuntimeError, match="kernel failed"), torch.no_grad():
        action_logprobs(model, *batch(), pad_id=PAD)
    assert model.lm_head is head


def test_fused_head_on_an_fsdp2_sharded_policy_equals_the_logits_path():
    """2 processes (gloo), FSDP2 over the blocks and the root: the head is sharded until the root forward."""
    for rank in dist_check_results():
        check = rank["fused_head"]
        assert check["fused_calls"] == 1 and check["head_type_after"] == "Linear"
        assert check["logp_max_diff"] < 1e-10 and check["entropy_max_diff"] < 1e-10
        assert check["grad_min_norm"] > 0 and check["grad_max_diff"] < 1e-10


def grouped_batch():
    """Four states, each repeated by a group of three rows with different actions (a group rollout);
    right padding holds garbage that must not matter."""
    states = [STATES[0], STATES[1], STATES[3], [7, 8]]
    g = torch.Generator().manual_seed(5)
    rows_s, rows_a = [], []
    for s in states:
        for _ in range(3):
            n = int(torch.randint(1, 5, (1,), generator=g))
            rows_s.append(s)
            rows_a.append(torch.randint(3, 200, (n,), generator=g).tolist())
    state_ids, state_len = right_pad(rows_s, 9, garbage=77)
    action_ids, action_len = right_pad(rows_a, 5, garbage=88)
    return state_ids, state_len, action_ids, action_len


def spy_shared(monkeypatch):
    import fastarcher.policy as policy_module

    used, real = [], policy_module.shared_prefix

    def spy(*args, **kwargs):
        prefix = real(*args, **kwargs)
        used.append(prefix is not None)
        return prefix

    monkeypatch.setattr(policy_module, "shared_prefix", spy)
    return used


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("constrained", [False, True])
def test_shared_states_give_the_whole_forwards_values_and_gradients(model, monkeypatch, fused, constrained):
    """Each distinct state runs once and its rows continue from its keys/values. Values match to float64
    rounding; gradients to ~1e-6 relative, because Llama's RMSNorm computes in float32 and summing the
    rows' gradients before the shared prefix's backward (instead of after) rounds differently there."""
    used = spy_shared(monkeypatch)
    state_ids, state_len, action_ids, action_len = grouped_batch()
    constraint = None
    if constrained:
        constraint = ActionConstraint([a[: int(n)].tolist() for a, n in zip(action_ids, action_len)],
                                      vocab_size=model.config.vocab_size)
    out = {}
    for share in (False, True):
        model.zero_grad()
        logp, entropy, mask = action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD,
                                              constraint=constraint, per_token=True, fused_head=fused,
                                              share_states=share)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        out[share] = (logp.detach(), entropy.detach(), mask, [p.grad.clone() for p in model.parameters()])
    assert used == [True]
    (lp0, e0, m0, g0), (lp1, e1, m1, g1) = out[False], out[True]
    assert torch.equal(m0, m1)
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-9)
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-9)
    for a, b in zip(g0, g1):
        assert a.norm() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_states_that_do_not_repeat_enough_take_the_whole_forward(model, monkeypatch):
    used = spy_shared(monkeypatch)
    state_ids, state_len, action_ids, action_len = batch()  # four distinct states
    action_logprobs(model, state_ids, state_len, action_ids, action_len, pad_id=PAD, share_states=True)
    g_ids, g_len, g_actions, g_alen = grouped_batch()
    g_len[-3:] = 1  # a one-token state has no prefix to share
    action_logprobs(model, g_ids, g_len, g_actions, g_alen, pad_id=PAD, share_states=True)
    assert used == [False, False]


def test_an_fsdp2_sharded_policy_takes_the_whole_forward_when_states_repeat():
    """2 processes (gloo): FSDP2 frees the gathered weights after each root forward, so the shared prefix
    (two root forwards before one backward) fails there ("setStorage ... out of bounds", seen); it is
    refused and the whole forward runs, the same values and gradients as without asking."""
    for rank in dist_check_results():
        check = rank["shared_states"]
        assert check["refused"]
        assert check["logp_max_diff"] == 0 and check["grad_max_diff"] == 0 and check["grad_min_norm"] > 0
