"""KL toward the reference policy (fastarcher/algos/kl_control.py) with a real tiny model: the reference is
the policy when RL starts, penalties in the reward are β·k(log π, log π_ref) per sampled token, the loss term
is β·token-mean k with the policy's gradient, β adapts from the iteration's mean KL; plus REINFORCE++'s token
rewards and the turn-level return helpers by hand, and the config rules."""
import copy
from types import SimpleNamespace

import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.actor import Actor
from fastarcher.algos.kl import kl_full, kl_penalty
from fastarcher.algos.kl_control import KLControl
from fastarcher.algos.on_policy import PolicyTokens, discounted_turn_returns, episode_sums
from fastarcher.algos.reinforce_pp import token_rewards
from fastarcher.config import KLConfig, TrainConfig
from fastarcher.policy import action_logprobs
from fastarcher.replay import TransitionBatch


def _ctx(estimator="low_var_kl", placement="reward", adaptive=False, coef=0.5):
    policy, tok = tiny_policy(torch.float64, seed=1, init_std=0.3)
    cfg = SimpleNamespace(kl=KLConfig(coef=coef, estimator=estimator, placement=placement, adaptive=adaptive,
                                      target=0.01, horizon=100),
                          rollout=SimpleNamespace(max_new_tokens=3, group_size=1), archer=SimpleNamespace(batch_size=2))
    actor = Actor(policy, None, None, rollout_cfg=cfg.rollout, pad_id=tok.pad_token_id, stop_id=tok.eos_token_id,
                  constraint=None, device=torch.device("cpu"))
    return SimpleNamespace(cfg=cfg, actor=actor, make_policy=lambda: copy.deepcopy(tiny_policy(torch.float64, seed=9)[0]),
                           shard=lambda module, blocks: module)


def _batch(pad):
    g = torch.Generator().manual_seed(0)
    state = torch.randint(5, 60, (3, 5), generator=g)
    action = torch.randint(5, 60, (3, 4), generator=g)
    state_len, action_len = torch.tensor([5, 3, 4]), torch.tensor([4, 2, 3])  # row 0: 4 > max_new_tokens (cut)
    for ids, n in ((state, state_len), (action, action_len)):
        ids[torch.arange(ids.shape[1])[None, :] >= n[:, None]] = pad
    zeros = torch.zeros(3)
    return TransitionBatch(state_ids=state, state_len=state_len, action_ids=action, action_len=action_len,
                           next_obs_ids=torch.full((3, 1), pad), next_obs_len=torch.zeros(3, dtype=torch.long),
                           reward=zeros, done=zeros, mc_return=zeros, pad_id=pad)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))


@pytest.mark.parametrize("estimator", ["kl", "abs", "mse", "low_var_kl", "full"])
def test_reward_penalties_are_beta_times_the_estimate_per_sampled_token(estimator):
    ctx = _ctx(estimator)
    kl = KLControl(ctx)
    kl.start(resumed=False)  # the reference takes the policy's weights
    batch = _batch(ctx.actor.pad_id)
    assert kl.reward_penalties(batch).abs().max() == 0  # π = π_ref: every estimator is 0
    assert kl.end_iteration(episodes=3)["kl/value"] == 0
    _perturb(ctx.actor.policy)
    penalty = kl.reward_penalties(batch)
    sampled = torch.tensor([3, 2, 3])  # the 4th token of row 0 closed a cut utterance: never sampled
    lp, _, mask, dist = action_logprobs(ctx.actor.policy, batch.state_ids, batch.state_len, batch.action_ids,
                                        batch.action_len, pad_id=ctx.actor.pad_id, per_token=True,
                                        sampled_len=sampled, log_distribution=True)
    ref = tiny_policy(torch.float64, seed=1, init_std=0.3)[0]  # the unperturbed policy, built independently
    rlp, _, _, rdist = action_logprobs(ref, batch.state_ids, batch.state_len, batch.action_ids, batch.action_len,
                                       pad_id=ctx.actor.pad_id, per_token=True, sampled_len=sampled,
                                       log_distribution=True)
    k = kl_full(dist, rdist) if estimator == "full" else kl_penalty(lp, rlp, estimator)
    expected = (0.5 * k * mask).float()
    assert penalty.shape == (3, 4) and penalty[0, 3] == 0 and penalty[1, 2:].abs().max() == 0
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=1e-7)
    assert penalty.abs().max() > 1e-4
    metrics = kl.end_iteration(episodes=3)
    assert metrics["kl/value"] == pytest.approx(float((k * mask).sum() / mask.sum()), rel=1e-5)
    assert metrics["kl/coef"] == 0.5


def test_loss_term_is_beta_times_the_token_mean_with_the_policy_gradient():
    ctx = _ctx("mse", placement="loss")
    kl = KLControl(ctx)
    kl.start(resumed=False)
    _perturb(ctx.actor.policy)
    batch = _batch(ctx.actor.pad_id)
    sampled = torch.tensor([3, 2, 3])
    lp, ent, mask = ctx.actor.token_logprobs(batch.state_ids, batch.state_len, batch.action_ids, batch.action_len,
                                             sampled_len=sampled)
    tokens = PolicyTokens(logprob=lp, mask=mask, entropy=ent, weights=torch.ones(3))
    loss, metrics = kl.loss_term(batch, tokens, None)
    ref_lp = kl.reference.token_logprobs(batch)[0]
    expected = 0.5 * (0.5 * (lp - ref_lp).square() * mask).sum() / mask.sum()  # β · token-mean of k2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grads = [p.grad for p in ctx.actor.policy.parameters() if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)
    assert all(p.grad is None for p in kl.reference.model.parameters())  # the reference is frozen


def test_adaptive_coefficient_moves_toward_the_target_and_a_resume_keeps_the_reference():
    ctx = _ctx("kl", adaptive=True)
    kl = KLControl(ctx)
    kl.start(resumed=False)
    _perturb(ctx.actor.policy)
    kl.reward_penalties(_batch(ctx.actor.pad_id))
    metrics = kl.end_iteration(episodes=10)
    error = max(min(metrics["kl/value"] / 0.01 - 1, 0.2), -0.2)
    assert kl.beta == pytest.approx(0.5 * (1 + error * 10 / 100))
    parts = kl.parts()
    assert set(parts) == {"reference", "kl_controller"} and parts["kl_controller"].state_dict() == {"value": kl.beta}
    before = [p.clone() for p in kl.reference.model.parameters()]
    kl.start(resumed=True)  # a resumed run keeps the anchor it loaded
    assert all(torch.equal(a, b) for a, b in zip(before, kl.reference.model.parameters()))


def test_no_kl_builds_no_reference():
    kl = KLControl(_ctx(coef=0.0))
    assert kl.reference is None and kl.parts() == {} and kl.end_iteration(4) == {}
    assert not kl.in_loss and not kl.in_reward


def test_turn_returns_and_episode_sums_by_hand():
    rewards = torch.tensor([0.0, 0.0, 1.0, -0.5, 2.0])
    # episode 1: turns 0..2, G = [0 + .5·(0 + .5·1), 0 + .5·1, 1] = [.25, .5, 1]; episode 2: [-.5 + .5·2, 2]
    returns = discounted_turn_returns(rewards, [3, 2], 0.5)
    assert returns.tolist() == [0.25, 0.5, 1.0, 0.5, 2.0]
    assert episode_sums(rewards, [3, 2]).tolist() == [1.0, 1.5]


def test_reinforce_pp_token_rewards_put_the_turn_reward_last_and_the_penalty_on_every_token():
    scored = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # episode 0: turns 0, 1; episode 1: turn 2
    penalty = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.4], [0.5, 9.0, 9.0]])  # 9: off the scored tokens
    rewards, mask, _ = token_rewards(torch.tensor([0.0, 1.0, 2.0]), penalty, scored, [2, 1])
    # episode 0 = turn 0 (2 tokens) | sep | turn 1 (3 tokens); episode 1 = turn 2 (1 token), padded to 6
    assert mask.tolist() == [[1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    expected = torch.tensor([[-0.1, -0.2, 0.0, -0.3, 0.0, 1.0 - 0.4], [2.0 - 0.5, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(rewards, expected)


def test_kl_config_rules():
    with pytest.raises(ValueError, match="applies to the policy-gradient algorithms"):
        TrainConfig(algo="chai", kl=KLConfig(coef=0.1)).validate()
    with pytest.raises(ValueError, match="archer' takes the KL in the actor loss only"):
        TrainConfig(algo="archer", kl=KLConfig(coef=0.1, placement="reward")).validate()
    with pytest.raises(ValueError, match="--kl.placement reward"):
        TrainConfig(algo="reinforce_pp", kl=KLConfig(coef=0.1, placement="loss")).validate()
    with pytest.raises(ValueError, match="kl.target"):
        TrainConfig(algo="grpo", kl=KLConfig(coef=0.1, target=0.0)).validate()
    TrainConfig(algo="reinforce_pp", kl=KLConfig(coef=0.1, placement="reward")).validate()
