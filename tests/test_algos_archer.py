"""ArCHer targets and losses against hand-computed values; reference: YifeiZhou02/ArCHer
archer/algorithms/archer/trainer.py (critic_loss, actor_loss)."""
import pytest
import torch

from fastarcher.algos.archer import (actor_loss, archer_advantage, critic_loss, critic_targets,
                                     token_baseline_actor_loss)

t = torch.tensor


def test_critic_targets_hand_computed():
    # reward [1, -1, 0.5], done [0, 1, 0], V̄1(s') [2, 5, -1], V̄2(s') [3, 7, 4], gamma 0.9
    # y_Q1 = r + 0.9 (1 - d) V̄1 = [1 + 1.8, -1 + 0, 0.5 - 0.9] = [2.8, -1.0, -0.4]
    # y_Q2 = r + 0.9 (1 - d) V̄2 = [1 + 2.7, -1 + 0, 0.5 + 3.6] = [3.7, -1.0, 4.1]
    # y_Vi = Q̄i(s, a′) unchanged
    y_q1, y_q2, y_v1, y_v2 = critic_targets(
        reward=t([1.0, -1.0, 0.5]), done=t([0.0, 1.0, 0.0]), target_v1_next=t([2.0, 5.0, -1.0]),
        target_v2_next=t([3.0, 7.0, 4.0]), target_q1_fresh=t([0.1, 0.2, 0.3]), target_q2_fresh=t([-0.1, -0.2, -0.3]),
        gamma=0.9)
    torch.testing.assert_close(y_q1, t([2.8, -1.0, -0.4]))
    torch.testing.assert_close(y_q2, t([3.7, -1.0, 4.1]))
    torch.testing.assert_close(y_v1, t([0.1, 0.2, 0.3]))
    torch.testing.assert_close(y_v2, t([-0.1, -0.2, -0.3]))


def test_critic_targets_mix_in_the_monte_carlo_return():
    # the same rows as above with G = [0.5, -1.0, 2.0] and λ = 0.25:
    # y_Q1 = 0.75·[2.8, -1.0, -0.4] + 0.25·G = [2.225, -1.0, 0.2]; y_Q2 = 0.75·[3.7, -1.0, 4.1] + 0.25·G = [2.9, -1.0, 3.575]
    y_q1, y_q2, y_v1, _ = critic_targets(
        reward=t([1.0, -1.0, 0.5]), done=t([0.0, 1.0, 0.0]), target_v1_next=t([2.0, 5.0, -1.0]),
        target_v2_next=t([3.0, 7.0, 4.0]), target_q1_fresh=t([0.1, 0.2, 0.3]), target_q2_fresh=t([-0.1, -0.2, -0.3]),
        gamma=0.9, mc_return=t([0.5, -1.0, 2.0]), mc_mix=0.25)
    torch.testing.assert_close(y_q1, t([2.225, -1.0, 0.2]))
    torch.testing.assert_close(y_q2, t([2.9, -1.0, 3.575]))
    torch.testing.assert_close(y_v1, t([0.1, 0.2, 0.3]))  # V still regresses to Q̄(s, a′)
    with pytest.raises(ValueError, match="needs the Monte-Carlo returns"):
        critic_targets(reward=t([1.0]), done=t([0.0]), target_v1_next=t([1.0]), target_v2_next=t([1.0]),
                       target_q1_fresh=t([0.0]), target_q2_fresh=t([0.0]), gamma=0.9, mc_mix=0.5)
    with pytest.raises(ValueError, match=r"mc_mix \(1.5\) must be in \[0, 1\]"):
        critic_targets(reward=t([1.0]), done=t([0.0]), target_v1_next=t([1.0]), target_v2_next=t([1.0]),
                       target_q1_fresh=t([0.0]), target_q2_fresh=t([0.0]), gamma=0.9, mc_return=t([1.0]), mc_mix=1.5)


def test_critic_targets_use_own_target_head_not_min():
    # head 2 has the larger V̄; a min over heads would give both Q targets 1 + 0.5·1 = 1.5
    y_q1, y_q2, _, _ = critic_targets(reward=t([1.0]), done=t([0.0]), target_v1_next=t([1.0]),
                                      target_v2_next=t([3.0]), target_q1_fresh=t([0.0]), target_q2_fresh=t([0.0]),
                                      gamma=0.5)
    assert y_q1.tolist() == [1.5] and y_q2.tolist() == [2.5]


def test_critic_targets_are_detached():
    v = t([1.0, 2.0], requires_grad=True)
    q = t([3.0, 4.0], requires_grad=True)
    ys = critic_targets(reward=t([0.0, 0.0]), done=t([0.0, 0.0]), target_v1_next=v, target_v2_next=v * 2,
                        target_q1_fresh=q, target_q2_fresh=q * 2, gamma=0.9)
    assert all(not y.requires_grad for y in ys)
    with pytest.raises(ValueError, match="gamma"):
        critic_targets(reward=v, done=v, target_v1_next=v, target_v2_next=v, target_q1_fresh=v,
                       target_q2_fresh=v, gamma=1.5)


def test_critic_loss_hand_computed():
    # MSE(Q1=[1,2], y=[0,4]) = (1 + 4)/2 = 2.5 ; MSE(Q2=[0,0], y=[1,-1]) = (1 + 1)/2 = 1.0
    # MSE(V1=[3,3], y=[3,1]) = (0 + 4)/2 = 2.0 ; MSE(V2=[1,2], y=[2,2]) = (1 + 0)/2 = 0.5
    # loss = 2.5 + 1 + 2 + 0.5 = 6.0 ; q_loss = 3.5 ; v_loss = 2.5
    q1, q2, v1, v2 = (t(x, requires_grad=True) for x in ([1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 2.0]))
    loss, m = critic_loss(q1=q1, q2=q2, v1=v1, v2=v2, y_q1=t([0.0, 4.0]), y_q2=t([1.0, -1.0]),
                          y_v1=t([3.0, 1.0]), y_v2=t([2.0, 2.0]))
    torch.testing.assert_close(loss, t(6.0))
    torch.testing.assert_close(m["critic/q_loss"], t(3.5))
    torch.testing.assert_close(m["critic/v_loss"], t(2.5))
    torch.testing.assert_close(m["critic/q1_mean"], t(1.5))
    torch.testing.assert_close(m["critic/q_mean"], t(0.0))  # min(Q1,Q2) = [0, 0]
    torch.testing.assert_close(m["critic/v1_mean"], t(3.0))
    torch.testing.assert_close(m["critic/target_q_mean"], t(1.0))  # (2 + 0)/2
    torch.testing.assert_close(m["critic/target_v_mean"], t(2.0))  # (2 + 2)/2
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    # d/dq1 of mean (q1 − y)² = 2 (q1 − y) / B = [1, -2]
    torch.testing.assert_close(q1.grad, t([1.0, -2.0]))
    torch.testing.assert_close(v2.grad, t([-1.0, 0.0]))


def test_critic_loss_does_not_backprop_into_targets():
    y = t([1.0, 2.0], requires_grad=True)
    q = t([0.0, 0.0], requires_grad=True)
    loss, _ = critic_loss(q1=q, q2=q, v1=q, v2=q, y_q1=y, y_q2=y, y_v1=y, y_v2=y)
    loss.backward()
    assert y.grad is None and q.grad is not None


def test_archer_advantage_hand_computed():
    # min(Q1,Q2) = min([1,5],[2,3]) = [1,3] ; min(V1,V2) = min([0,4],[1,-1]) = [0,-1] ; A = [1, 4]
    q1 = t([1.0, 5.0], requires_grad=True)
    adv = archer_advantage(q1=q1, q2=t([2.0, 3.0]), v1=t([0.0, 4.0]), v2=t([1.0, -1.0]))
    assert adv.tolist() == [1.0, 4.0] and not adv.requires_grad


def test_actor_loss_hand_computed_and_sign():
    # Σ log π = [-1, -2, -0.5], A = [2, -1, 4]: A·logπ = [-2, 2, -2], mean = -2/3, pg_loss = 2/3
    # entropy [1, 2, 3] mean 2, coeff 0.1: loss = 2/3 − 0.2 = 0.46667
    lp = t([-1.0, -2.0, -0.5], requires_grad=True)
    ent = t([1.0, 2.0, 3.0], requires_grad=True)
    loss, m = actor_loss(logprob_sum=lp, advantage=t([2.0, -1.0, 4.0]), entropy=ent, entropy_coeff=0.1)
    torch.testing.assert_close(loss, t(2 / 3 - 0.2))
    torch.testing.assert_close(m["actor/pg_loss"], t(2 / 3))
    torch.testing.assert_close(m["actor/advantage_mean"], t(5 / 3))
    # population std of [2, -1, 4]: mean 5/3, squared deviations 1/9 + 64/9 + 49/9 = 114/9, / 3 → sqrt(38/9)
    torch.testing.assert_close(m["actor/advantage_std"], t((38 / 9) ** 0.5))
    torch.testing.assert_close(m["actor/entropy"], t(2.0))
    loss.backward()
    # ∂loss/∂lp_b = −A_b / B: descent raises log π where A > 0
    torch.testing.assert_close(lp.grad, t([-2 / 3, 1 / 3, -4 / 3]))
    torch.testing.assert_close(ent.grad, t([-0.1 / 3] * 3))


def test_actor_loss_detaches_advantage_and_requires_entropy_for_bonus():
    adv = t([1.0, -1.0], requires_grad=True)
    loss, m = actor_loss(logprob_sum=t([-1.0, -1.0], requires_grad=True), advantage=adv)
    loss.backward()
    assert adv.grad is None and "actor/entropy" not in m
    with pytest.raises(ValueError, match="entropy_coeff"):
        actor_loss(logprob_sum=t([-1.0]), advantage=t([1.0]), entropy_coeff=0.01)


def test_token_baseline_actor_loss_hand_computed():
    # logπ [[-1,-2],[-0.5,0]], b [[1,0],[2,0]], A [2,-1], mask [[1,1],[1,0]]
    # residual A − b = [[1,2],[-3,·]] ; value loss = (1 + 4 + 9)/3 = 14/3
    # pg per row: 1·(-1) + 2·(-2) = -5 ; (-3)·(-0.5) = 1.5 ; pg_loss = −mean(-5, 1.5) = 1.75
    lp = t([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    values = t([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    loss, m = token_baseline_actor_loss(token_logprobs=lp, token_values=values, advantage=t([2.0, -1.0]),
                                        mask=t([[1, 1], [1, 0]]))
    torch.testing.assert_close(m["actor/pg_loss"], t(1.75))
    torch.testing.assert_close(m["actor/value_loss"], t(14 / 3))
    torch.testing.assert_close(loss, t(1.75 + 14 / 3))
    loss.backward()
    # ∂/∂b = −2 (A − b) mask / 3 (policy term uses the detached residual)
    torch.testing.assert_close(values.grad, t([[-2 / 3, -4 / 3], [2.0, 0.0]]))
    torch.testing.assert_close(lp.grad, t([[-0.5, -1.0], [1.5, 0.0]]))


def test_archer_losses_gradcheck_float64():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    q1, q2, v1, v2 = (torch.randn(4, **d) for _ in range(4))
    ys = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, e: critic_loss(q1=a, q2=b, v1=c, v2=e, y_q1=ys[0], y_q2=ys[1], y_v1=ys[2], y_v2=ys[3])[0],
        (q1, q2, v1, v2))
    lp, ent = torch.randn(5, **d), torch.rand(5, **d)
    adv = torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, e: actor_loss(logprob_sum=a, advantage=adv, entropy=e, entropy_coeff=0.3)[0], (lp, ent))
    tl, tv = torch.randn(3, 4, **d), torch.randn(3, 4, **d)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    # the policy term uses a detached residual, so check each input with the other's term held fixed:
    # w.r.t. log π with b constant, and w.r.t. b with log π = 0 (the policy term then vanishes)
    assert torch.autograd.gradcheck(
        lambda a: token_baseline_actor_loss(token_logprobs=a, token_values=tv.detach(), advantage=adv[:3],
                                            mask=mask)[0], (tl,))
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda b: token_baseline_actor_loss(token_logprobs=zeros, token_values=b, advantage=adv[:3], mask=mask)[0],
        (tv,))


def _cpu_trainer(argv: list[str]):
    """A one-process CPU Trainer built from train flags (run from the repository root: presets are relative)."""
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    return Trainer(parse_config(argv), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_token_baseline_flag_trains_a_token_value_model_started_from_the_policy(tmp_path, monkeypatch):
    from dist_helpers import REPO

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo archer --archer.token-baseline --archer.warmup-iterations 0 "
             "--rollout.num-envs 4 --eval.episodes 2 --log.no-progress --model.num-layers 1 --critic.num-layers 1 "
             "--archer.batch-size 4 --archer.critic-epochs 1 --archer.actor-epochs 2").split()
    trainer = _cpu_trainer([*flags, "--log.run-dir", str(tmp_path / "run")])
    algo = trainer.algorithm
    assert {"token_baseline", "token_baseline_opt"} <= set(algo.parts())
    algo.start(resumed=False)
    assert all(torch.equal(a, b) for a, b in zip(algo.baseline.lm.parameters(), trainer.policy.parameters()))
    head = algo.baseline.head.weight.detach().clone()
    metrics = trainer.iterate()
    assert {"actor/value_loss", "actor/token_value_mean", "actor/token_baseline_grad_norm"} <= set(metrics)
    assert not torch.equal(head, algo.baseline.head.weight)  # b_h moved toward the advantages
    assert algo.baseline_opt.state  # stepped by its own optimizer, not the actor's
    trainer.logger.close()


def test_kl_flag_adds_the_kl_to_the_actor_loss_on_fresh_actions(tmp_path, monkeypatch):
    from dist_helpers import REPO

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo archer --kl.coef 0.5 --kl.estimator mse --archer.warmup-iterations 0 "
             "--rollout.num-envs 4 --eval.episodes 2 --log.no-progress --model.num-layers 1 --critic.num-layers 1 "
             "--archer.batch-size 4 --archer.critic-epochs 1 --archer.actor-epochs 3 --optim.actor-lr 1e-2 "
             "--optim.actor-grad-clip 1.0").split()
    trainer = _cpu_trainer([*flags, "--log.run-dir", str(tmp_path / "run")])
    algo = trainer.algorithm
    assert {"reference", "kl_controller"} <= set(algo.parts())
    algo.start(resumed=False)
    metrics = trainer.iterate()
    # the first actor step measures KL 0 (π = π_ref); the later ones, after steps at lr 1e-2, do not
    assert metrics["kl/value"] > 0 and metrics["kl/coef"] == 0.5
    assert metrics["actor/loss"] == pytest.approx(metrics["actor/pg_loss"] - 0.001 * metrics["actor/entropy"]
                                                  + 0.5 * metrics["actor/kl_loss"], rel=1e-4, abs=1e-6)
    assert all(p.grad is None for p in algo.kl.reference.model.parameters())
    trainer.logger.close()



def test_critic_init_policy_starts_both_critic_encoders_from_the_warm_started_trunk(tmp_path, monkeypatch):
    from dist_helpers import REPO

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo archer --critic.init policy --warm-start.steps 3 "
             "--warm-start.demos oracle --rollout.num-envs 2 --eval.episodes 2 --log.no-progress "
             "--archer.batch-size 4 --archer.critic-epochs 2 --archer.actor-epochs 1").split()
    trainer = _cpu_trainer([*flags, "--log.run-dir", str(tmp_path / "run")])
    algo = trainer.algorithm
    random_init = {k: v.clone() for k, v in algo.critic.encoder.state_dict().items()}
    heads = {k: v.clone() for k, v in algo.critic.state_dict().items() if not k.startswith("encoder.")}
    trainer.warm_start()  # moves the policy: the copy must be of the trunk after it
    algo.start(resumed=False)
    trunk = trainer.policy.model.state_dict()
    assert set(trunk) == set(random_init)
    for name, value in trunk.items():
        assert torch.equal(algo.critic.encoder.state_dict()[name], value), name
        assert torch.equal(algo.target.encoder.state_dict()[name], value), name
        assert not torch.equal(random_init[name], value) or name.endswith("norm.weight"), name
    assert all(torch.equal(algo.critic.state_dict()[k], v) for k, v in heads.items())  # heads keep their init
    trainer.iterate()  # the critic trains its own copy: the policy's trunk is not its parameter
    assert not torch.equal(algo.critic.encoder.layers[0].mlp.up_proj.weight, trainer.policy.model.layers[0].mlp.up_proj.weight)
    assert not any(p is q for p in algo.critic.parameters() for q in trainer.policy.parameters())
    trainer.logger.close()


def test_critic_init_policy_refuses_an_encoder_of_another_shape(tmp_path, monkeypatch):
    from dist_helpers import REPO

    monkeypatch.chdir(REPO)
    argv = ["--config", "configs/tiny_cpu.yaml", "--critic.init", "policy", "--critic.num-layers", "1",
            "--log.no-progress", "--log.run-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"critic.init policy: the critic encoder's 'layers.1.*None.*num_layers"):
        _cpu_trainer(argv)


@pytest.mark.parametrize("flags", [["--critic.encoder", "policy"], ["--model.lora.rank", "4"],
                                   ["--critic.encoder-path", "."]])
def test_critic_init_policy_config_refusals(flags):
    from fastarcher.train import parse_config

    with pytest.raises(ValueError, match="critic.init policy copies the policy's trunk"):
        parse_config(["--critic.init", "policy", *flags]).validate(world_size=1)


def test_warm_start_to_replay_puts_every_demonstration_turn_in_the_buffer(tmp_path, monkeypatch):
    from dist_helpers import REPO

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo archer --warm-start.steps 1 --warm-start.demos oracle "
             "--warm-start.episodes 5 --rollout.num-envs 2 --eval.episodes 2 --log.no-progress --model.num-layers 1 "
             "--critic.num-layers 1 --archer.batch-size 4 --archer.critic-epochs 1").split()
    for to_replay in (False, True):
        trainer = _cpu_trainer([*flags, *(["--warm-start.to-replay"] if to_replay else []),
                                "--log.run-dir", str(tmp_path / f"run{to_replay}")])
        buffer = trainer.algorithm.buffer
        trainer.warm_start()
        if not to_replay:
            assert len(buffer) == 0
            trainer.logger.close()
            continue
        stored = buffer.gather(torch.arange(len(buffer)))
        assert int(stored.done.sum()) == 5  # five oracle episodes, each ending in the goal
        assert float(stored.reward.sum()) == pytest.approx(5 * float(stored.reward.max())) and stored.reward.max() > 0
        assert int(stored.action_len.min()) >= 2  # an action and the stop token, as played turns are stored
        played = trainer.iterate()
        assert len(buffer) == len(stored) + round(played["rollout/episode_len"] * 2)  # demos stay, turns join
        trainer.logger.close()
