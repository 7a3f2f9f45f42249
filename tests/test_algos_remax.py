"""ReMax (fastarcher/algos/remax.py): the baseline of each sampled episode is the greedy episode's return from
its seed, by hand; the loop plays one greedy episode per distinct seed, and greedy play is deterministic."""
from types import SimpleNamespace

import pytest
import torch

from fastarcher.algos.remax import greedy_baselines


def _episode(seed, reward, dropped=False):
    return SimpleNamespace(seed=seed, total_reward=reward, dropped=dropped, turns=[object()])


def test_each_sampled_episode_gets_its_seeds_greedy_return():
    greedy = [_episode(7, 1.0), _episode(9, -0.5), _episode(11, 2.0, dropped=True)]
    baseline, missing = greedy_baselines([7, 7, 9, 11, 9], greedy)
    assert baseline.tolist() == [1.0, 1.0, -0.5, 0.0, -0.5] and missing == 1  # seed 11's greedy episode dropped


def test_the_loop_plays_one_greedy_episode_per_distinct_seed(tmp_path, monkeypatch):
    from dist_helpers import REPO
    from fastarcher.dist import DistInfo
    from fastarcher.metrics import MetricBag
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    flags = ("--config configs/tiny_cpu.yaml --algo remax --rollout.num-envs 6 --rollout.group-size 3 "
             "--eval.episodes 2 --log.no-progress --model.num-layers 1").split()
    cfg = parse_config([*flags, "--log.run-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    seen = {}
    update = trainer.algorithm.update

    def spy(batch, bag):
        seen["batch"] = batch
        return update(batch, bag)

    trainer.algorithm.update = spy
    metrics = trainer.iterate()
    batch = seen["batch"]
    seeds = trainer.train_seeds()
    assert [e.seed for e in batch.greedy.episodes] == [seeds[0], seeds[3]]  # two groups of three
    again = trainer.play(trainer.greedy_runner, [seeds[0], seeds[3]], greedy=True)
    assert [[t.action for t in e.turns] for e in again.episodes] == \
        [[t.action for t in e.turns] for e in batch.greedy.episodes]  # greedy play is deterministic
    greedy_mean = sum(e.total_reward for e in batch.greedy.episodes) / 2  # groups of equal size
    assert metrics["actor/greedy_return_mean"] == pytest.approx(greedy_mean)
    assert metrics["count/remax_missing_baselines"] == 0
    trainer.logger.close()
