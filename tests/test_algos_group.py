"""Group-baselined policy gradient (fastarcher/algos/group.py): GRPO / RLOO advantages by hand, every turn
of an episode weighted by its episode's advantage, groups of episodes per env seed, and the config rules."""
from types import SimpleNamespace

import pytest
import torch

from fastarcher.algos.group import GRPO, RLOO, turn_weights
from fastarcher.config import KLConfig, TrainConfig


def _algo(cls, group_std: bool = True):
    return cls(SimpleNamespace(cfg=SimpleNamespace(baseline=SimpleNamespace(group_std=group_std), kl=KLConfig())))


def test_turn_weights_give_every_turn_its_episode_advantage():
    assert turn_weights(torch.tensor([0.5, -1.0, 2.0]), [2, 1, 3]).tolist() == [0.5, 0.5, -1.0, 2.0, 2.0, 2.0]
    assert turn_weights(torch.tensor([]), []).tolist() == []


def test_episode_weighting_shares_each_episodes_advantage_among_its_turns():
    # a success in 2 turns and a failure in 3: mean length 2.5, so scales 2.5/2 and 2.5/3
    w = turn_weights(torch.tensor([1.0, -1.0]), [2, 3], per_episode=True)
    assert w.tolist() == pytest.approx([1.25, 1.25, -2.5 / 3, -2.5 / 3, -2.5 / 3])
    assert w[:2].sum() == pytest.approx(-w[2:].sum())  # each episode's turns carry |A| x mean length
    plain = turn_weights(torch.tensor([1.0, -1.0]), [2, 3])
    assert plain.sum() == -1.0  # per turn, the longer failure outweighs the success
    same = [2, 2, 2]  # equal lengths: no change
    assert torch.equal(turn_weights(torch.tensor([0.5, -1.0, 2.0]), same, per_episode=True),
                       turn_weights(torch.tensor([0.5, -1.0, 2.0]), same))
    assert turn_weights(torch.tensor([]), [], per_episode=True).tolist() == []


def test_grpo_and_rloo_advantages_by_hand():
    returns = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])  # two groups of three (env seeds 7 and 9)
    # group 7: mean 1/3; deviations 2/3, -1/3, -1/3; unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3)
    # group 9: mean 2/3; deviations -1/6, -1/6, 1/3; unbiased std sqrt((1/36 + 1/36 + 1/9) / 2) = sqrt(1/12)
    s7, s9 = (1 / 3) ** 0.5, (1 / 12) ** 0.5
    expected = torch.tensor([2 / 3 / s7, -1 / 3 / s7, -1 / 3 / s7, -1 / 6 / s9, -1 / 6 / s9, 1 / 3 / s9])
    assert torch.allclose(_algo(GRPO).advantages(returns, groups), expected, atol=1e-5)
    dr_grpo = torch.tensor([2 / 3, -1 / 3, -1 / 3, -1 / 6, -1 / 6, 1 / 3])  # no std division
    assert torch.allclose(_algo(GRPO, group_std=False).advantages(returns, groups), dr_grpo, atol=1e-6)
    # leave-one-out: episode 0 vs mean(0, 0) = 0 → 1; episode 1 vs mean(1, 0) = 0.5 → -0.5; ...
    loo = torch.tensor([1.0, -0.5, -0.5, -0.25, -0.25, 0.5])
    assert torch.allclose(_algo(RLOO).advantages(returns, groups), loo, atol=1e-6)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_algorithms_need_groups_that_fit_on_one_process(algo):
    with pytest.raises(ValueError, match="rollout.group_size to 2 or more"):
        TrainConfig(algo=algo).validate()
    cfg = TrainConfig(algo=algo)
    cfg.rollout.num_envs, cfg.rollout.group_size = 12, 4
    cfg.validate(world_size=1)  # 12 episodes, 3 groups of 4
    with pytest.raises(ValueError, match=r"rollout.num_envs \(12\) / processes \(2\) must be a multiple of "
                                         r"rollout.group_size \(4\)"):
        cfg.validate(world_size=2)  # 6 per process: a group would straddle two processes


def test_train_seeds_repeat_each_seed_group_size_times(tmp_path, monkeypatch):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(__import__("dist_helpers").REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo grpo --rollout.num-envs 6 --rollout.group-size 3 "
             "--eval.episodes 2 --log.no-progress --model.num-layers 1").split()
    cfg = parse_config([*flags, "--log.run-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    seeds = trainer.train_seeds()
    assert seeds[0:3] == [seeds[0]] * 3 and seeds[3:6] == [seeds[0] + 1] * 3
    rollout = trainer.play(trainer.runner, seeds, greedy=False)
    assert [e.seed for e in rollout.episodes] == seeds
    trainer.iteration = 1
    assert trainer.train_seeds()[0] == seeds[0] + 6  # the next iteration's groups are new seeds
    trainer.logger.close()


def test_algorithm_modules_import_nothing_from_the_trainer():
    from dist_helpers import REPO

    for path in sorted((REPO / "fastarcher" / "algos").glob("*.py")):
        text = path.read_text()
        assert "fastarcher.trainer" not in text and "from fastarcher import trainer" not in text, path.name
