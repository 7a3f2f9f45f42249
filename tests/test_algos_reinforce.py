"""REINFORCE/GRPO group baselines and policy-gradient loss against hand-computed values."""
import pytest
import torch

from fastarcher.algos.reinforce import group_advantages, policy_gradient_loss

t = torch.tensor


def test_group_advantages_single_group_is_batch_mean_baseline():
    # mean of [1, 2, 6] = 3 → [-2, -1, 3]
    adv = group_advantages(t([1.0, 2.0, 6.0]), None, normalize_std=False)
    torch.testing.assert_close(adv, t([-2.0, -1.0, 3.0]))
    same = group_advantages(t([1.0, 2.0, 6.0]), t([4, 4, 4]), normalize_std=False)
    torch.testing.assert_close(same, adv)


def test_group_advantages_per_group_hand_computed():
    # groups by label: 5 → rows 0,1,3 with returns [1, 2, 10], mean 13/3 ; 7 → row 2 alone
    # A = [1 − 13/3, 2 − 13/3, 0, 10 − 13/3] = [-10/3, -7/3, 0, 17/3]
    returns, groups = t([1.0, 2.0, 3.0, 10.0]), t([5, 5, 7, 5])
    adv = group_advantages(returns, groups, normalize_std=False)
    torch.testing.assert_close(adv, t([-10 / 3, -7 / 3, 0.0, 17 / 3]))
    # unbiased std of group 5: (100/9 + 49/9 + 289/9) / 2 = 438/18 = 24.333 → 4.9329 ; the lone row stays 0
    std = (438 / 18) ** 0.5
    norm = group_advantages(returns, groups, normalize_std=True, eps=1e-12)
    torch.testing.assert_close(norm, t([-10 / 3 / std, -7 / 3 / std, 0.0, 17 / 3 / std]))


def test_group_advantages_constant_group_is_zero_not_nan():
    adv = group_advantages(t([2.0, 2.0, 1.0, 3.0]), t([0, 0, 1, 1]), normalize_std=True)
    assert torch.isfinite(adv).all()
    assert adv[:2].tolist() == [0.0, 0.0] and adv[2] < 0 < adv[3]


def test_group_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(t([1.0, 2.0]), t([0, 0, 1]), normalize_std=False)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(t([1.0, 2.0]), None, normalize_std=True, eps=0.0)


def test_policy_gradient_loss_hand_computed():
    # A [1, -2], Σ log π [-0.5, -1.5]: A·lp = [-0.5, 3], mean 1.25, loss −1.25 ; ∂/∂lp = −A/2 = [-0.5, 1]
    lp = t([-0.5, -1.5], requires_grad=True)
    adv = t([1.0, -2.0], requires_grad=True)
    loss, m = policy_gradient_loss(logprob_sum=lp, advantage=adv)
    torch.testing.assert_close(loss, t(-1.25))
    torch.testing.assert_close(m["actor/advantage_mean"], t(-0.5))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([-0.5, 1.0]))
    assert adv.grad is None


def test_policy_gradient_loss_gradcheck_float64():
    torch.manual_seed(0)
    lp = torch.randn(6, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: policy_gradient_loss(logprob_sum=x, advantage=adv)[0], (lp,))


def test_length_normalized_loss_weighs_each_utterances_mean_token_logprob():
    from fastarcher.algos.on_policy import PolicyTokens
    from fastarcher.algos.reinforce import length_normalized_pg_loss, pg_loss

    logprob = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tokens = PolicyTokens(logprob=logprob, mask=mask, entropy=torch.zeros(2, 3), weights=torch.tensor([1.0, -2.0]))
    # sums -4, -2: −mean(1·(−4), −2·(−2)) = −mean(−4, 4) = 0; means −2, −2: −mean(−2, 4) = −1
    assert pg_loss(tokens)[0].item() == 0.0
    loss, _ = length_normalized_pg_loss(tokens)
    assert loss.item() == -1.0
    loss.backward()
    # ∂/∂logprob[0, t] = −½ · 1 · ½ for t < 2; ∂/∂logprob[1, 0] = −½ · (−2) · 1
    assert logprob.grad.tolist() == [[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]]


def test_policy_gradient_loss_gradcheck_float64():
    lp = torch.randn(4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: policy_gradient_loss(logprob_sum=x, advantage=adv)[0], (lp,))
