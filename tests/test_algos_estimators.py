"""On-policy advantage/return estimators against hand-computed values, masked multi-turn rows and properties."""
import pytest
import torch

from fastarcher.algos.estimators import (
    archer_token_advantages,
    bilevel_gae,
    discounted_returns,
    gae,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)
from fastarcher.algos.reinforce import group_advantages

t = torch.tensor

# A multi-turn row: [act act act | obs obs | act act | obs | act act | pad pad]
MT_MASK = t([[1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.float32)
MT_ACTIONS = [0, 1, 2, 5, 6, 8, 9]  # the 7 action tokens; 9 is the last one
MT_TURNS = [[0, 1, 2], [5, 6], [8, 9]]


def _terminal_reward_row() -> torch.Tensor:
    r = torch.zeros_like(MT_MASK)
    r[0, 9] = 1.0  # only a terminal reward, on the last action token
    return r


def _random_multiturn(b: int = 5, T: int = 17, seed: int = 0):
    """Random rows of turns separated by observation runs and right padding; rewards on action tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, T)
    for i in range(b):
        pos = int(torch.randint(0, 2, (), generator=g))  # optional prompt/obs prefix
        end = T - int(torch.randint(0, 4, (), generator=g))  # padding at the end
        while pos < end:
            n = int(torch.randint(1, 4, (), generator=g))
            mask[i, pos:min(pos + n, end)] = 1.0
            pos += n + int(torch.randint(1, 3, (), generator=g))
    rewards = torch.randn(b, T, generator=g) * mask
    values = torch.randn(b, T, generator=g)
    return rewards, values, mask


# ---------------------------------------------------------------------------------------------- RLOO / ReMax


def test_rloo_hand_computed():
    # groups 7 → rows 0,2,3 with returns [1, 2, 6]; 3 → rows 1,4 with [4, 10]; 9 → row 5 alone
    # row 0: 1 − (2+6)/2 = −3 ; row 2: 2 − (1+6)/2 = −1.5 ; row 3: 6 − (1+2)/2 = 4.5
    # row 1: 4 − 10 = −6 ; row 4: 10 − 4 = 6 ; row 5: group of one → 0
    adv = rloo_advantages(t([1.0, 4.0, 2.0, 6.0, 10.0, 5.0]), t([7, 3, 7, 7, 3, 9]))
    torch.testing.assert_close(adv, t([-3.0, -6.0, -1.5, 4.5, 6.0, 0.0]))


def test_rloo_equals_rescaled_group_mean_and_brute_force():
    g = torch.Generator().manual_seed(1)
    returns = torch.randn(12, generator=g)
    groups = t([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 1, 0])  # sizes 5, 3, 3, 1
    adv = rloo_advantages(returns, groups)
    size = torch.stack([(groups == groups[i]).sum() for i in range(12)]).float()
    scaled = group_advantages(returns, groups, normalize_std=False) * size / (size - 1).clamp(min=1)
    torch.testing.assert_close(adv, scaled)
    # independent leave-one-out loop
    for i in range(12):
        others = [returns[j] for j in range(12) if j != i and groups[j] == groups[i]]
        expected = returns[i] - torch.stack(others).mean() if others else torch.zeros(())
        torch.testing.assert_close(adv[i], expected)


def test_remax_hand_computed_and_shape_check():
    # [1 − 0.5, 0 − 0.5, 3 − 3]
    torch.testing.assert_close(remax_advantages(t([1.0, 0.0, 3.0]), t([0.5, 0.5, 3.0])), t([0.5, -0.5, 0.0]))
    with pytest.raises(ValueError, match="greedy_returns"):
        remax_advantages(t([1.0, 0.0]), t([0.5]))


# ------------------------------------------------------------------------------ hand-computed token level


def test_discounted_returns_hand_computed_skips_observations():
    # action tokens 0, 1, 4, 5 (2, 3 observation, 6 padding), γ = 0.5
    # G5 = 2 ; G4 = 0 + 0.5·2 = 1 ; G1 = 0 + 0.5·G4 = 0.5 (obs tokens skipped) ; G0 = 1 + 0.5·0.5 = 1.25
    mask = t([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)
    rewards = t([[1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]])
    out = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(out, t([[1.25, 0.5, 0.0, 0.0, 1.0, 2.0, 0.0]]))
    # rewards on masked-out positions are ignored
    noisy = rewards + t([[0.0, 0.0, 5.0, -3.0, 0.0, 0.0, 7.0]])
    torch.testing.assert_close(discounted_returns(noisy, mask, gamma=0.5), out)


def test_reinforce_pp_hand_computed():
    # returns as above on the action tokens: [1.25, 0.5, 1, 2], n = 4, μ = 4.75/4 = 1.1875
    # deviations [0.0625, −0.6875, −0.1875, 0.8125], squares sum 1.171875, unbiased var 1.171875/3 = 0.390625,
    # σ = 0.625 → A = [0.1, −1.1, −0.3, 1.3]
    mask = t([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)
    rewards = t([[1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=1e-12)
    torch.testing.assert_close(adv, t([[0.1, -1.1, 0.0, 0.0, -0.3, 1.3, 0.0]]))


def test_reinforce_pp_whitens_over_the_whole_batch_not_per_row():
    # row 0 returns [1, 1], row 1 returns [3, 3]: batch μ = 2, unbiased σ = sqrt(4/3); per-row whitening would give 0
    mask = t([[1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    rewards = t([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=1.0, eps=1e-12)
    s = (4 / 3) ** 0.5
    torch.testing.assert_close(adv, t([[-1 / s, -1 / s, 0.0], [1 / s, 1 / s, 0.0]]))


def test_gae_hand_computed():
    # action tokens 0, 1, 3; the obs (2) / pad (4) carry value 9 that must never be bootstrapped;
    # γ = λ = 0.5 (γλ = 0.25)
    # t3: δ = 2 + 0 − 1 = 1                  A3 = 1                          R3 = 2
    # t1: δ = 1 + 0.5·V3(1) − 1 = 0.5        A1 = 0.5 + 0.25·1 = 0.75        R1 = 1.75
    # t0: δ = 0 + 0.5·V1(1) − 0.5 = 0        A0 = 0 + 0.25·0.75 = 0.1875     R0 = 0.6875
    mask = t([[1, 1, 0, 1, 0]], dtype=torch.float32)
    rewards = t([[0.0, 1.0, 0.0, 2.0, 0.0]])
    values = t([[0.5, 1.0, 9.0, 1.0, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([[0.1875, 0.75, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, t([[0.6875, 1.75, 0.0, 2.0, 0.0]]))


# turn 1 = tokens 0,1 ; obs 2 ; turn 2 = tokens 3,4 (with an inner reward 0.5 on token 3) ; pad 5
BL_MASK = t([[1, 1, 0, 1, 1, 0]], dtype=torch.float32)
BL_REWARDS = t([[0.0, 1.0, 0.0, 0.5, 2.0, 0.0]])
BL_VALUES = t([[0.2, 0.4, 9.0, 0.6, 0.8, 9.0]])


def test_bilevel_gae_hand_computed():
    # γ = 0.5, λ = 0.5, γ_H = 0.9
    # turn level: R2 = 0.5 + 2 = 2.5, V2 = V[4] = 0.8: δ2 = 2.5 − 0.8 = 1.7, A2 = 1.7, G2 = 2.5
    #             R1 = 1, V1 = V[1] = 0.4: δ1 = 1 + 0.9·0.8 − 0.4 = 1.32,
    #             A1 = 1.32 + 0.9·0.5·1.7 = 2.085, G1 = 2.485
    # token level (γλ = 0.25):
    #   t4 end:   A = G2 − V4 = 1.7                                  R = 2.5
    #   t3 inner: δ = 0.5·0.8 − 0.6 = −0.2, A = −0.2 + 0.25·1.7 = 0.225   R = 0.825  (its 0.5 reward is in R2)
    #   t1 end:   A = G1 − V1 = 2.085                                R = 2.485
    #   t0 inner: δ = 0.5·0.4 − 0.2 = 0, A = 0.25·2.085 = 0.52125     R = 0.72125
    adv, ret = bilevel_gae(BL_REWARDS, BL_VALUES, BL_MASK, gamma=0.5, lam=0.5, high_level_gamma=0.9)
    torch.testing.assert_close(adv, t([[0.52125, 2.085, 0.0, 0.225, 1.7, 0.0]]))
    torch.testing.assert_close(ret, t([[0.72125, 2.485, 0.0, 0.825, 2.5, 0.0]]))


def test_archer_token_advantages_hand_computed():
    # turn returns as in the bi-level case (same λ, γ_H): G = 2.485 on tokens 0,1 and 2.5 on tokens 3,4
    # α = 0.5: Ṽ = 0.5·V + 0.5·G → t0 1.3425, t1 1.4425, t3 1.55, t4 1.65
    # token GAE over all action tokens with the raw rewards, γ = 0.5, γλ = 0.25:
    #   t4: δ = 2 − 1.65 = 0.35                          A = 0.35                                R = 2.0
    #   t3: δ = 0.5 + 0.5·1.65 − 1.55 = −0.225           A = −0.225 + 0.25·0.35 = −0.1375        R = 1.4125
    #   t1: δ = 1 + 0.5·1.55 − 1.4425 = 0.3325           A = 0.3325 − 0.25·0.1375 = 0.298125     R = 1.740625
    #   t0: δ = 0.5·1.4425 − 1.3425 = −0.62125           A = −0.62125 + 0.25·0.298125 = −0.54671875
    #                                                    R = −0.54671875 + 1.3425 = 0.79578125
    adv, ret = archer_token_advantages(
        BL_REWARDS, BL_VALUES, BL_MASK, gamma=0.5, lam=0.5, high_level_gamma=0.9, archer_alpha=0.5)
    torch.testing.assert_close(adv, t([[-0.54671875, 0.298125, 0.0, -0.1375, 0.35, 0.0]]))
    torch.testing.assert_close(ret, t([[0.79578125, 1.740625, 0.0, 1.4125, 2.0, 0.0]]))


# ---------------------------------------------------------------------------------------------- double count


def test_archer_counts_future_turns_once():
    # 3 turns of 2 tokens, obs tokens between, reward 1 at each turn end; γ = γ_H = λ = 1, α = 1, zero critic.
    # Correct turn returns G = [3, 3, 2, 2, 1, 1] on the turns' tokens, and the realised token returns are the
    # same numbers, so every advantage is 0 and the first token's return is 3 = 1 + 1 + 1.
    # RAGEN's high-level recursion H_k = R_k + 2·H_{k+1} gives H = 7, 3, 1 → first-turn advantage 3 − 7 = −4.
    mask = t([[1, 1, 0, 1, 1, 0, 1, 1, 0]], dtype=torch.float32)
    rewards = t([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    zeros = torch.zeros_like(rewards)
    adv, ret = archer_token_advantages(rewards, zeros, mask, gamma=1.0, lam=1.0, high_level_gamma=1.0, archer_alpha=1.0)
    torch.testing.assert_close(adv, zeros)
    torch.testing.assert_close(ret, t([[3.0, 3.0, 0.0, 2.0, 2.0, 0.0, 1.0, 1.0, 0.0]]))


def test_archer_lam1_return_is_discounted_sum_once_for_any_mix():
    # λ = 1: R_t = Σ_i γ^i r_{t_i} exactly, whatever α and the critic; the mix only shifts the baseline
    rewards, values, mask = _random_multiturn(seed=3)
    expected = discounted_returns(rewards, mask, gamma=0.9)
    for alpha in (0.0, 0.3, 1.0):
        adv, ret = archer_token_advantages(rewards, values, mask, gamma=0.9, lam=1.0,
                                           high_level_gamma=0.8, archer_alpha=alpha)
        torch.testing.assert_close(ret, expected)
        # first token of row 0: its return is the γ-discounted sum over the row's action tokens, once
        first = int(mask[0].nonzero()[0])
        r0 = rewards[0][mask[0] > 0]
        once = (r0 * 0.9 ** torch.arange(r0.numel(), dtype=torch.float32)).sum()
        torch.testing.assert_close(ret[0, first], once)
    # α = 1 with γ = γ_H = 1, zero critic: Ṽ is the turn return G_k (all of turn k's rewards and later ones),
    # which equals the realised return from the turn's FIRST token → advantage 0 there (a double-counted
    # turn return would make it negative)
    adv, _ = archer_token_advantages(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0,
                                     high_level_gamma=1.0, archer_alpha=1.0)
    on = mask > 0
    starts = on & ~torch.nn.functional.pad(on[:, :-1], (1, 0), value=False)
    torch.testing.assert_close(adv[starts], torch.zeros(int(starts.sum())))


# ------------------------------------------------------------------------------ masked multi-turn, terminal reward


def test_terminal_reward_reaches_first_turn_token_level():
    # 7 action tokens; action token i (0-based) is 6 − i action steps before the reward → γ^(6−i);
    # observation tokens do not discount
    rewards, zeros = _terminal_reward_row(), torch.zeros_like(MT_MASK)
    expected = torch.zeros_like(MT_MASK)
    for i, p in enumerate(MT_ACTIONS):
        expected[0, p] = 0.9 ** (6 - i)
    torch.testing.assert_close(discounted_returns(rewards, MT_MASK, gamma=0.9), expected)
    adv, ret = gae(rewards, zeros, MT_MASK, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)
    _, ret = archer_token_advantages(rewards, zeros, MT_MASK, gamma=0.9, lam=1.0, high_level_gamma=0.5,
                                     archer_alpha=0.5)
    torch.testing.assert_close(ret, expected)
    # REINFORCE++: the whitened version of the same returns
    g = expected[0, MT_ACTIONS]
    white = torch.zeros_like(MT_MASK)
    white[0, MT_ACTIONS] = (g - g.mean()) / g.std()
    torch.testing.assert_close(reinforce_pp_advantages(rewards, MT_MASK, gamma=0.9, eps=1e-12), white)


def test_terminal_reward_reaches_first_turn_bilevel():
    # γ = 1 inside turns, γ_H = 0.9 per turn, λ = 1, zero critic: turn 3 gets 1, turn 2 0.9, turn 1 0.81
    rewards, zeros = _terminal_reward_row(), torch.zeros_like(MT_MASK)
    expected = torch.zeros_like(MT_MASK)
    for k, turn in enumerate(MT_TURNS):
        expected[0, turn] = 0.9 ** (2 - k)
    adv, ret = bilevel_gae(rewards, zeros, MT_MASK, gamma=1.0, lam=1.0, high_level_gamma=0.9)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)
    # γ = 0.5 discounts only across action tokens inside a turn: token 0 is 2 steps before turn 1's end
    _, ret = bilevel_gae(rewards, zeros, MT_MASK, gamma=0.5, lam=1.0, high_level_gamma=0.9)
    torch.testing.assert_close(ret[0, [0, 1, 2, 5, 6, 8, 9]],
                               t([0.25 * 0.81, 0.5 * 0.81, 0.81, 0.5 * 0.9, 0.9, 0.5, 1.0]))


# ---------------------------------------------------------------------------------------------- properties


def _all_outputs(rewards, values, mask):
    yield "discounted_returns", discounted_returns(rewards, mask, gamma=0.9)
    yield "reinforce_pp", reinforce_pp_advantages(rewards, mask, gamma=0.9)
    for name, fn in (
        ("gae", lambda: gae(rewards, values, mask, gamma=0.9, lam=0.8)),
        ("bilevel", lambda: bilevel_gae(rewards, values, mask, gamma=0.9, lam=0.8, high_level_gamma=0.7)),
        ("archer", lambda: archer_token_advantages(rewards, values, mask, gamma=0.9, lam=0.8,
                                                   high_level_gamma=0.7, archer_alpha=0.4)),
    ):
        adv, ret = fn()
        yield name + ".adv", adv
        yield name + ".ret", ret


def test_masked_out_positions_are_zero_everywhere():
    rewards, values, mask = _random_multiturn(seed=5)
    rewards = rewards + 3.0 * (1 - mask)  # junk rewards on obs/pad must be ignored, not leak to zeros
    values = values + 50.0 * (1 - mask)
    for name, out in _all_outputs(rewards, values, mask):
        assert out.shape == mask.shape, name
        assert torch.isfinite(out).all(), name
        assert (out[mask == 0] == 0).all(), name
        assert (out[mask > 0] != 0).any(), name  # not trivially all-zero


def test_gae_lam1_zero_values_equals_discounted_returns_and_values_telescope():
    rewards, values, mask = _random_multiturn(seed=7)
    expected = discounted_returns(rewards, mask, gamma=0.95)
    adv, ret = gae(rewards, torch.zeros_like(values), mask, gamma=0.95, lam=1.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=1.0)
    torch.testing.assert_close(ret, expected)
    torch.testing.assert_close(adv, (expected - values) * mask)


def test_gae_lam0_is_one_step_td_error():
    # λ = 0: A at an action token = r + γ·V(next action token) − V, with the next action token found by hand
    rewards, values, mask = _random_multiturn(seed=11)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for b in range(mask.shape[0]):
        acts = mask[b].nonzero().flatten().tolist()
        for i, p in enumerate(acts):
            nxt = values[b, acts[i + 1]] if i + 1 < len(acts) else 0.0
            torch.testing.assert_close(adv[b, p], rewards[b, p] + 0.9 * nxt - values[b, p])


def test_bilevel_single_turn_with_end_reward_equals_gae():
    # one turn per row, reward only on its last token: turn level is a single step, so both estimators agree
    mask = t([[0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    rewards = t([[0.0, 0.0, 0.0, 0.0, 1.5, 0.0], [0.0, 0.0, -2.0, 0.0, 0.0, 0.0]])
    values = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    a_gae, r_gae = gae(rewards, values, mask, gamma=0.9, lam=0.7)
    a_bl, r_bl = bilevel_gae(rewards, values, mask, gamma=0.9, lam=0.7, high_level_gamma=0.3)
    torch.testing.assert_close(a_bl, a_gae)
    torch.testing.assert_close(r_bl, r_gae)


def test_rows_are_independent():
    rewards, values, mask = _random_multiturn(seed=13)
    batched = dict(_all_outputs(rewards, values, mask))
    for b in range(mask.shape[0]):
        row = dict(_all_outputs(rewards[b:b + 1], values[b:b + 1], mask[b:b + 1]))
        for name, out in row.items():
            if name == "reinforce_pp":
                continue  # whitened with batch statistics by design
            torch.testing.assert_close(out, batched[name][b:b + 1], msg=name)


def test_outputs_do_not_require_grad():
    rewards, values, mask = _random_multiturn(seed=17)
    rewards.requires_grad_(True)
    values.requires_grad_(True)
    for name, out in _all_outputs(rewards, values, mask):
        assert not out.requires_grad, name
    returns = torch.randn(4, requires_grad=True)
    assert not rloo_advantages(returns, t([0, 0, 1, 1])).requires_grad
    assert not remax_advantages(returns, torch.randn(4, requires_grad=True)).requires_grad


def test_rejects_bad_shapes_and_discounts():
    r, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="mask"):
        discounted_returns(r, torch.ones(2, 4), gamma=0.9)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.zeros(2, 4), m, gamma=0.9, lam=0.9)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, m, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="archer_alpha"):
        archer_token_advantages(r, r, m, gamma=1.0, lam=1.0, high_level_gamma=1.0, archer_alpha=-0.1)
    with pytest.raises(ValueError, match="group_ids"):
        rloo_advantages(t([1.0, 2.0]), t([0, 0, 1]))
