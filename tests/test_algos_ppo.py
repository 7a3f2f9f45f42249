"""PPO (fastarcher/algos/ppo.py): the token-level value model reads the hidden state that predicts each action
token (checked against the trunk run on each unpadded prefix), advantage whitening by hand, the estimator
switch, and a PPO update on one process whose value model fits the returns of a fixed batch."""
import pytest
import torch

from dist_helpers import tiny_policy
from fastarcher.algos.estimators import archer_token_advantages, bilevel_gae, gae
from fastarcher.algos.ppo import estimate, whiten
from fastarcher.config import PPOConfig, TrainConfig
from fastarcher.value_model import TokenValueModel


def test_token_values_are_the_head_on_the_hidden_state_before_each_action_token():
    lm, tok = tiny_policy(torch.float64, seed=2, init_std=0.3)
    model = TokenValueModel(lm)
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
        model.head.bias.fill_(0.25)
    pad = tok.pad_token_id
    state = torch.tensor([[5, 6, 7, 8], [9, 10, pad, pad]])
    action = torch.tensor([[11, 12, 13], [14, pad, pad]])
    values = model(state, torch.tensor([4, 2]), action, torch.tensor([3, 1]), pad_id=pad)
    assert values.shape == (2, 3)
    for row, (s_len, a_len) in enumerate([(4, 3), (2, 1)]):
        for h in range(a_len):
            prefix = torch.cat([state[row, :s_len], action[row, :h]])[None]  # s ⊕ a_<h, no padding
            hidden = lm.model(input_ids=prefix).last_hidden_state[0, -1]
            expected = (hidden @ model.head.weight[0] + model.head.bias[0]).float()
            torch.testing.assert_close(values[row, h], expected, rtol=1e-5, atol=1e-6)


def test_a_fresh_head_gives_zero_values():
    lm, tok = tiny_policy(torch.float64, seed=2)
    model = TokenValueModel(lm)
    values = model(torch.tensor([[5, 6]]), torch.tensor([2]), torch.tensor([[7, 8]]), torch.tensor([2]),
                   pad_id=tok.pad_token_id)
    assert values.abs().max() == 0


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # masked entries 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    torch.testing.assert_close(whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_estimator_switch_calls_the_named_estimator():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    cfg = PPOConfig(gamma=0.9, lam=0.8, high_level_gamma=0.7, archer_alpha=0.4)
    for name, expected in [("gae", gae(rewards, values, mask, 0.9, 0.8)),
                           ("bilevel_gae", bilevel_gae(rewards, values, mask, 0.9, 0.8, 0.7)),
                           ("archer", archer_token_advantages(rewards, values, mask, 0.9, 0.8, 0.7, 0.4))]:
        got = estimate(name, rewards, values, mask, cfg)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
    with pytest.raises(ValueError, match="ppo.estimator"):
        estimate("vtrace", rewards, values, mask, cfg)


def test_ppo_config_rules():
    with pytest.raises(ValueError, match="ppo.dual_clip"):
        TrainConfig(algo="ppo", ppo=PPOConfig(dual_clip=1.0)).validate()
    with pytest.raises(ValueError, match=r"ppo.lam \(1.5\)"):
        TrainConfig(algo="ppo", ppo=PPOConfig(lam=1.5)).validate()
    with pytest.raises(ValueError, match=r"ppo.target_kl \(0.0\) must be positive"):
        TrainConfig(algo="ppo", ppo=PPOConfig(target_kl=0.0)).validate()


@pytest.mark.parametrize("estimator,value_model", [("gae", "separate"), ("bilevel_gae", "separate"),
                                                   ("archer", "separate"), ("gae", "policy")])
def test_ppo_updates_fit_the_value_model_to_a_fixed_batch(tmp_path, monkeypatch, estimator, value_model):
    from dist_helpers import REPO
    from fastarcher.algos.base import IterationBatch
    from fastarcher.dist import DistInfo
    from fastarcher.metrics import MetricBag
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo ppo --rollout.num-envs 4 --eval.episodes 2 --log.no-progress "
             f"--model.num-layers 1 --ppo.estimator {estimator} --ppo.value-model {value_model} --ppo.epochs 2 --optim.critic-lr 1e-2 --archer.batch-size 8").split()
    cfg = parse_config([*flags, "--log.run-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.algorithm.start(resumed=False)
    if value_model == "separate":  # the trunk starts from the policy
        value_lm = trainer.algorithm.value.lm
        assert all(torch.equal(a, b) for a, b in zip(value_lm.parameters(), trainer.policy.parameters()))
    else:  # the head alone is the value model's state; the policy's trunk is read, never trained by it
        assert set(trainer.algorithm.value.state_dict()) == {"head.weight", "head.bias"}
    rollout = trainer.play(trainer.runner, trainer.train_seeds(), greedy=False)
    transitions = rollout.transitions(cfg.archer.gamma, trainer.pad_id)
    transitions.reward = torch.ones(len(transitions))  # returns to fit: the rewards still to come
    losses = []
    for it in range(8):
        bag = MetricBag()
        trainer.algorithm.update(IterationBatch(it, rollout, transitions), bag)
        losses.append(bag.means()["critic/value_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    trainer.logger.close()


def test_policy_value_head_reads_the_policy_without_a_gradient_into_it():
    from fastarcher.value_model import PolicyValueHead, hidden_before_tokens

    policy, tok = tiny_policy(torch.float64, seed=3, init_std=0.3)
    head = PolicyValueHead(policy)
    with torch.no_grad():
        head.head.weight.fill_(0.1)
    args = (torch.tensor([[5, 6, 7]]), torch.tensor([3]), torch.tensor([[8, 9]]), torch.tensor([2]))
    values = head(*args, pad_id=tok.pad_token_id)
    hidden = hidden_before_tokens(policy, *args, pad_id=tok.pad_token_id)
    torch.testing.assert_close(values, (0.1 * hidden.sum(-1)).float())
    values.sum().backward()
    assert head.head.weight.grad is not None and all(p.grad is None for p in policy.parameters())
    with pytest.raises(ValueError, match="ppo.value_model 'policy' is supported on one process only"):
        TrainConfig(algo="ppo", ppo=PPOConfig(value_model="policy")).validate(world_size=2)


def test_target_kl_stops_the_policy_steps_once_the_minibatch_kl_passes_it(tmp_path, monkeypatch):
    from dist_helpers import REPO
    from fastarcher.algos.base import IterationBatch
    from fastarcher.dist import DistInfo
    from fastarcher.metrics import MetricBag
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo ppo --rollout.num-envs 8 --eval.episodes 2 --log.no-progress "
             "--model.num-layers 1 --ppo.epochs 4 --archer.batch-size 8 --optim.actor-lr 1e-2").split()
    steps, kls = {}, {}
    for target in (None, 1e-9):
        cfg = parse_config([*flags, *(["--ppo.target-kl", str(target)] if target else []),
                            "--log.run-dir", str(tmp_path / f"run{target}")])
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        trainer.algorithm.start(resumed=False)
        rollout = trainer.play(trainer.runner, trainer.train_seeds(), greedy=False)
        transitions = rollout.transitions(cfg.archer.gamma, trainer.pad_id)
        transitions.reward = torch.arange(len(transitions), dtype=torch.float32) % 2  # a signal to follow
        bag = MetricBag()
        out = trainer.algorithm.update(IterationBatch(0, rollout, transitions), bag)
        steps[target] = out["actor/policy_steps"]
        kls[target] = bag.means()["actor/approx_kl"]
        if target is None:
            per_epoch = -(-len(transitions) // 8)  # minibatches of 8 rows per epoch
        trainer.logger.close()
    assert steps[None] == 4 * per_epoch  # no limit: every epoch runs
    # the first step measures KL 0 (π = π_old); the second, after a step at lr 1e-2, passes 1e-9 and stops
    assert steps[1e-9] == 2, (steps, kls)
