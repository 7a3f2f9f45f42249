"""Advantage and return estimators for on-policy baselines (RLOO, ReMax, REINFORCE++, GAE, bi-level GAE,
RAGEN's `archer` mix).

Conventions. Sequence-level inputs are (B,). Token-level tensors are (B, T) float; `mask` (B, T) is 1 on
tokens the policy generated (action tokens) and 0 on prompt / observation / padding tokens. A multi-turn
row looks like  [act act act | obs obs | act act | obs | act act | pad pad]  with mask  [1 1 1 0 0 1 1 0 1 1 0 0].
A *timestep* of the token-level estimators is an action token only: the value bootstrapped after the last
token of turn k is the value at the first action token of turn k+1 (observation tokens are skipped, they
neither discount nor carry a value), and after the row's last action token the next value is 0 (the
episode is over; truncated episodes that need a bootstrap are out of scope). Rewards sit on action tokens
(a turn's reward on its last action token); rewards on masked-out positions are ignored. A *turn* is a
maximal run of consecutive mask-1 tokens.

Every function is pure: tensors in, tensors out, no `.item()` / host syncs, no collectives, no model
calls. Outputs are detached (computed under `torch.no_grad()`) and are 0 on masked-out positions. The
token-level recursions loop over T (right to left) and are vectorised over the batch. Nothing here
whitens except `reinforce_pp_advantages` (whitening is part of REINFORCE++); RAGEN/verl whiten GAE
advantages inside their estimators, here the caller decides.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastarcher.algos.reinforce import group_advantages


def _check_1d(name: str, x: Tensor, like: Tensor) -> None:
    if x.dim() != 1 or x.shape != like.shape:
        raise ValueError(f"{name} must be 1-D with shape {tuple(like.shape)}, got {tuple(x.shape)}")


def _check_tokens(token_rewards: Tensor, mask: Tensor, values: Tensor | None = None) -> None:
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be (B, T), got shape {tuple(token_rewards.shape)}")
    if mask.shape != token_rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal token_rewards shape {tuple(token_rewards.shape)}")
    if values is not None and values.shape != token_rewards.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} must equal token_rewards shape {tuple(token_rewards.shape)}")


def _check_discount(**kwargs: float) -> None:
    for name, x in kwargs.items():
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} ({x}) must be in [0, 1]")


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


# ----------------------------------------------------------------------------------------------------
# Sequence-level baselines
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def rloo_advantages(returns: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO: A_i = R_i − mean_{j ≠ i, g(j) = g(i)} R_j; (B,), detached. A group of one gets 0.

    REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740).
    returns: (B,) float. group_ids: (B,) integer labels (episodes from the same prompt/seed).

    With n = |group| and m its mean, the leave-one-out mean is (n·m − R_i)/(n − 1), so
        A_i = R_i − (n·m − R_i)/(n − 1) = n/(n − 1) · (R_i − m),
    i.e. the group-mean advantage of `reinforce.group_advantages` rescaled by n/(n − 1); that function is
    reused for the mean and only the factor is applied here.
    """
    _check_1d("group_ids", group_ids, returns)
    returns = _float(returns)
    centred = group_advantages(returns, group_ids, normalize_std=False)  # R_i − m, 0 for a group of one
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts[inverse].to(returns.dtype)  # (B,) size of each row's group
    # n/(n−1); a group of one has centred == 0, the clamp only avoids 0/0 → NaN
    return centred * (n / (n - 1.0).clamp(min=1.0))


@torch.no_grad()
def remax_advantages(returns: Tensor, greedy_returns: Tensor) -> Tensor:
    """ReMax: A_i = R_i − R_greedy(prompt_i); (B,), detached.

    Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning Large Language Models", arXiv 2310.10505: the baseline is the return of the greedy
    (argmax) rollout from the same prompt. returns, greedy_returns: (B,), the greedy return already
    aligned to each sampled row by the caller.
    """
    _check_1d("greedy_returns", greedy_returns, returns)
    return (_float(returns) - _float(greedy_returns)).detach()


# ----------------------------------------------------------------------------------------------------
# Token-level estimators
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go over action tokens: G_t = r_t + γ · G_{next(t)}, G after the last action token = 0.

    token_rewards, mask: (B, T). Returns (B, T), detached, 0 where mask = 0.
    next(t) is the next action token of the row, so observation / padding tokens between turns neither
    discount nor add reward: G_t = Σ_{k ≥ 0} γ^k r_{a_{i+k}} where t = a_i and a_0 < a_1 < … are the row's
    action-token positions. (REINFORCE-style return, Williams 1992; verl's REINFORCE++ return loop
    instead resets at mask-0 tokens, which is only right for single-turn rows with trailing padding.)
    """
    _check_tokens(token_rewards, mask)
    _check_discount(gamma=gamma)
    rewards = _float(token_rewards)
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) return from the next action token on
    for t in range(rewards.shape[1] - 1, -1, -1):
        g = rewards[:, t] + gamma * running
        # on masked-out tokens the running return passes through unchanged (no step, no discount)
        running = torch.where(m[:, t] > 0, g, running)
        out[:, t] = g * m[:, t]
    return out


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float, eps: float = 1e-8) -> Tensor:
    """REINFORCE++: A_t = (G_t − μ) / sqrt(σ² + eps) on action tokens, 0 elsewhere; (B, T), detached.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    arXiv 2501.03262 (verl: `compute_reinforce_plus_plus_outcome_advantage`).
    G = `discounted_returns(token_rewards, mask, gamma)`; μ and σ² are the mean and the unbiased
    (Bessel, n/(n−1), as verl's `masked_whiten`) variance of G over all action tokens of the batch — a
    global baseline instead of a critic or a per-prompt group. The caller folds the token-level KL
    penalty −β·KL_t into token_rewards beforehand (REINFORCE++ puts the KL in the reward).
    With one action token in the batch the variance uses n − 1 clamped to 1 (verl raises there).
    """
    if not eps > 0:
        raise ValueError(f"eps ({eps}) must be positive (a constant batch has variance 0)")
    returns = discounted_returns(token_rewards, mask, gamma)
    m = mask.to(returns.dtype)
    n = m.sum()
    mean = (returns * m).sum() / n.clamp(min=1.0)
    var = ((returns - mean).pow(2) * m).sum() / (n - 1.0).clamp(min=1.0)
    return (returns - mean) * torch.rsqrt(var + eps) * m


def _masked_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, segment_end: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE over action tokens with the skip rule; optional `segment_end` (B, T) bool marks action tokens
    after which the episode is treated as terminal (next value 0, GAE trace reset). Returns (adv, ret)."""
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V at the next action token, 0 past the last one
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,) GAE at the next action token
    for t in range(rewards.shape[1] - 1, -1, -1):
        if segment_end is not None:
            cut = segment_end[:, t]
            next_value = torch.where(cut, torch.zeros_like(next_value), next_value)
            next_adv = torch.where(cut, torch.zeros_like(next_adv), next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error δ_t
        a = delta + gamma * lam * next_adv
        on = m[:, t] > 0
        # masked-out tokens are not timesteps: the bootstrap state skips over them untouched
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
        adv[:, t] = a * m[:, t]
    return adv, (adv + values) * m


@torch.no_grad()
def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Token-level GAE over action tokens: (advantages, returns), both (B, T), detached, 0 where mask = 0.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv 1506.02438 (verl: `compute_gae_advantage_return`; RAGEN's loss-mask variant skips obs tokens).
        δ_t = r_t + γ · V_{next(t)} − V_t,    A_t = δ_t + γλ · A_{next(t)},    R_t = A_t + V_t,
    where next(t) is the next action token (observation tokens skipped, not steps) and V / A after the
    row's last action token are 0. λ = 1 gives A_t = G_t − V_t (Monte-Carlo, G = `discounted_returns`);
    λ = 0 gives the one-step TD error.
    token_rewards, values, mask: (B, T).
    """
    _check_tokens(token_rewards, mask, values)
    _check_discount(gamma=gamma, lam=lam)
    rewards = _float(token_rewards)
    values = values.to(rewards.dtype)
    return _masked_gae(rewards * mask.to(rewards.dtype), values, mask, gamma, lam)


def _turn_level(
    token_rewards: Tensor, values: Tensor, mask: Tensor, high_level_gamma: float, lam: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Turn-level GAE; returns (turn_end (B,T) bool, A^turn, G^turn), the last two (B, T) broadcast over
    every action token of their turn (0 elsewhere).

    Turn k spans action tokens s_k..e_k; R_k = Σ_{t=s_k..e_k} r_t, V_k = values[e_k];
    δ_k = R_k + γ_H · V_{k+1} − V_k, A_k = δ_k + γ_H λ · A_{k+1}, G_k = A_k + V_k (V_{K+1} = A_{K+1} = 0).
    """
    m = mask.to(token_rewards.dtype)
    on = m > 0
    prev_on = torch.nn.functional.pad(on[:, :-1], (1, 0), value=False)
    next_on = torch.nn.functional.pad(on[:, 1:], (0, 1), value=False)
    turn_end = on & ~next_on  # (B, T) last action token of each turn
    turn_start = on & ~prev_on
    rewards = token_rewards * m
    # R_k without a host sync: suffix sums C_t = Σ_{t' ≥ t} r_t', R_k = C[s_k] − C[e_k + 1]
    suffix = rewards.flip(1).cumsum(1).flip(1)
    suffix_next = torch.nn.functional.pad(suffix[:, 1:], (0, 1), value=0.0)  # C[t + 1]
    pos = torch.arange(rewards.shape[1], device=rewards.device).expand_as(turn_start)
    start_of = torch.where(turn_start, pos, torch.zeros_like(pos)).cummax(dim=1).values  # s_k for t in turn k
    turn_reward = suffix.gather(1, start_of) - suffix_next  # (B, T) read at turn ends only

    turn_adv = torch.zeros_like(rewards)
    turn_ret = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # V_{k+1}
    next_adv = torch.zeros_like(rewards[:, 0])  # A_{k+1}
    cur_adv = torch.zeros_like(rewards[:, 0])  # A_k of the turn being walked (right to left)
    cur_ret = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        end = turn_end[:, t]
        a = turn_reward[:, t] + high_level_gamma * next_value - values[:, t] + high_level_gamma * lam * next_adv
        cur_adv = torch.where(end, a, cur_adv)
        cur_ret = torch.where(end, a + values[:, t], cur_ret)
        next_value = torch.where(end, values[:, t], next_value)
        next_adv = torch.where(end, a, next_adv)
        turn_adv[:, t] = cur_adv * m[:, t]
        turn_ret[:, t] = cur_ret * m[:, t]
    return turn_end, turn_adv, turn_ret


@torch.no_grad()
def bilevel_gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, high_level_gamma: float,
) -> tuple[Tensor, Tensor]:
    """Bi-level GAE (RAGEN, Wang et al. 2025, arXiv 2504.20073): turn-level GAE across turns, then
    token-level GAE inside each turn seeded at the turn end. (advantages, returns), (B, T), detached.

    High level (the agentic MDP, one step per turn). Turn k = a maximal run of action tokens s_k..e_k:
        R_k = Σ_{t=s_k..e_k} r_t,   V_k = values[e_k]   (value at the turn's LAST action token),
        δ_k = R_k + γ_H · V_{k+1} − V_k,   A_k = δ_k + γ_H λ · A_{k+1},   G_k = A_k + V_k,
    with V_{K+1} = A_{K+1} = 0 after the last turn (γ_H = high_level_gamma).
    Low level (the token MDP inside turn k), right to left:
        last token e_k:  target G_k, no bootstrap, trace reset:  A_{e_k} = G_k − V_{e_k} (= A_k), R_{e_k} = G_k;
        inner t < e_k:   δ_t = γ · V_{t+1} − V_t,  A_t = δ_t + γλ · A_{t+1},  R_t = A_t + V_t.
    Each token reward is counted once, inside R_k (so it is not added again at the inner tokens); at λ = 1
    the return of token t of turn k is γ^{e_k − t} · G_k, and credit crosses turns only through G_k
    (discounted by γ_H per turn, never by γ over observation tokens).

    Follows RAGEN `compute_bi_level_gae_advantage_return` (RAGEN-AI/RAGEN, ragen/trainer/core_algos.py):
    same two recursions, same end-of-turn target (the turn-level return, next value 0, trace reset).
    Differs: (1) turns are runs of mask-1 tokens, not "tokens with a non-zero reward" — RAGEN's rule merges
    a turn whose reward is 0 into the next one (its tokens then bootstrap across the observation into
    the next turn), and splits a turn at every token once a KL penalty makes all rewards non-zero;
    (2) consequently a turn can carry rewards on inner tokens (e.g. a KL penalty), so R_k sums them and
    the inner tokens' low-level reward is 0 — each reward is counted once, in R_k; (3) no whitening here
    (RAGEN whitens over the loss mask inside).
    token_rewards, values, mask: (B, T).
    """
    _check_tokens(token_rewards, mask, values)
    _check_discount(gamma=gamma, lam=lam, high_level_gamma=high_level_gamma)
    rewards = _float(token_rewards)
    values = values.to(rewards.dtype)
    turn_end, _, turn_ret = _turn_level(rewards, values, mask, high_level_gamma, lam)
    # the seed G_k enters as the "reward" of the end token, with the episode cut after it; inner tokens
    # get reward 0 because their rewards are already inside R_k ⊂ G_k
    seeded = torch.where(turn_end, turn_ret, torch.zeros_like(turn_ret))
    return _masked_gae(seeded, values, mask, gamma, lam, segment_end=turn_end)


@torch.no_grad()
def archer_token_advantages(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    high_level_gamma: float,
    archer_alpha: float,
) -> tuple[Tensor, Tensor]:
    """RAGEN's `archer` estimator without its double count: token-level GAE whose value function is the
    critic mixed with the turn-level return. (advantages, returns), (B, T), detached.

    1. Turn level, exactly as in `bilevel_gae`: G_k = A_k + V_k, the turn-level λ-return of turn k
       (R_k = Σ of turn k's token rewards, V_k = values at its last action token, discount γ_H per turn);
       at λ = 1, G_k = Σ_{j ≥ k} γ_H^{j−k} R_j — every later turn's reward counted once.
    2. Mixed value, broadcast over the turn:  Ṽ_t = (1 − α) · V_t + α · G_{k(t)}  for every action token t
       of turn k(t)  (α = archer_alpha).
    3. Token-level GAE over all action tokens of the row (skip rule, crossing turns) with the raw token
       rewards and Ṽ:
           δ_t = r_t + γ · Ṽ_{next(t)} − Ṽ_t,   A_t = δ_t + γλ · A_{next(t)},   R_t = A_t + Ṽ_t.

    What is counted once where. Unrolling 3 gives the λ-return
        R_t = Σ_{i ≥ 0} (γλ)^i [ r_{t_i} + γ(1 − λ) · Ṽ_{t_{i+1}} ]   (t_0 = t, t_1 = next(t), …):
    every reward enters once, through the token recursion; G (inside Ṽ) only enters as a bootstrap
    weighted by (1 − λ), i.e. as an estimate of the rewards that the truncated sum leaves out, never on
    top of them. At λ = 1 the bootstrap vanishes: R_t = Σ_i γ^i r_{t_i}, the discounted sum of rewards,
    and A_t = R_t − Ṽ_t (G only moves the baseline).

    RAGEN's `compute_archer_advantage_return` (RAGEN-AI/RAGEN @ 8781c3ba, ragen/trainer/core_algos.py)
    computes its high-level value with a zero critic and bootstraps each turn with the *already
    accumulated* return of the next turn:  H_k = R_k + γ_H · H_{k+1} + γ_H λ · H_{k+1}  (its GAE trace
    equals H_{k+1} because the baseline is 0), so at λ = 1 the future turns' return is counted twice
    (H_k = R_k + 2 γ_H H_{k+1}) and that inflated H enters Ṽ. Here the turn level is a proper GAE
    (bootstrap = critic value, trace = advantage), so G_k counts each later reward once. Other
    differences: RAGEN puts H only on reward-bearing tokens, so every other token's value is shrunk to
    (1 − α)·V; here G_k is broadcast over its turn so α is a convex mix at every token. Turns are mask
    runs (see `bilevel_gae`), and nothing is whitened here (RAGEN whitens inside).
    Caveat: G uses γ_H per turn while the token recursion uses γ per action token; the mix is a
    heuristic baseline unless γ = γ_H = 1.
    token_rewards, values, mask: (B, T).
    """
    _check_tokens(token_rewards, mask, values)
    _check_discount(gamma=gamma, lam=lam, high_level_gamma=high_level_gamma, archer_alpha=archer_alpha)
    rewards = _float(token_rewards)
    values = values.to(rewards.dtype)
    _, _, turn_ret = _turn_level(rewards, values, mask, high_level_gamma, lam)
    mixed = (1.0 - archer_alpha) * values + archer_alpha * turn_ret
    return _masked_gae(rewards * mask.to(rewards.dtype), mixed, mask, gamma, lam)
