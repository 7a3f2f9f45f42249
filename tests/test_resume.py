"""Resume semantics in one process (fastarcher/checkpoint.py through the trainer).

Reference: an uninterrupted run with the same settings; "identical" means torch.equal on every tensor
and == on every logged metric except time/* and perf/*.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fastarcher.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.every 2 "
        "--eval.no-random-baseline --archer.batch-size 8 --archer.warmup-iterations 2 --replay.capacity 64 "
        "--log.no-progress --checkpoint.no-export-hf").split()


def build(run_dir: Path, *flags: str):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    cfg = parse_config([*TINY, "--log.run-dir", str(run_dir), *flags])
    cfg.validate(world_size=1)
    return Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def run(run_dir: Path, *flags: str):
    trainer = build(run_dir, *flags)
    trainer.summary = trainer.fit()
    trainer.save_final()
    trainer.logger.close()
    return trainer


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def full_state(trainer) -> dict:
    """Every tensor that decides what happens next."""
    state = {f"policy.{k}": v for k, v in trainer.policy.state_dict().items()}
    archer = trainer.algorithm
    state.update({f"critic.{k}": v for k, v in archer.critic.state_dict().items()})
    state.update({f"target.{k}": v for k, v in archer.target.state_dict().items()})
    state.update({f"engine.{k}": v for k, v in trainer.engine.model.state_dict().items()})
    for name, opt in (("actor_opt", trainer.actor_opt), ("critic_opt", archer.critic_opt)):
        for i, s in opt.state_dict()["state"].items():
            state.update({f"{name}.{i}.{k}": v for k, v in s.items()})
    state.update({f"replay.{k}": v for k, v in archer.buffer.state_dict().items()})
    for name in ("sample_gen", "buffer_gen", "cpu_gen"):
        state[name] = getattr(trainer.streams, name).get_state()
    state["torch_rng"] = torch.get_rng_state()
    return state


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    torch.set_num_threads(1)
    os.chdir(REPO)
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer = run(run_dir, "--iterations", "4")
    return run_dir, full_state(trainer), trainer.summary


def test_stop_and_resume_is_identical_to_a_straight_run(straight, tmp_path):
    straight_dir, straight_state, straight_summary = straight
    run_dir = tmp_path / "run"
    run(run_dir, "--iterations", "2")
    with open(run_dir / "metrics.jsonl", "a") as f:  # rows a crashed attempt logged after its checkpoint
        f.write(json.dumps({"iteration": 3, "rollout/return_mean": 123.0}) + "\n" + '{"iteration": 4, "rol')
    resumed = run(run_dir, "--iterations", "4", "--checkpoint.resume", "auto")
    assert resumed.checkpointer.resumed_from == run_dir / "checkpoints" / "iter_000002"
    state = full_state(resumed)
    assert state.keys() == straight_state.keys()
    different = [k for k in state if not torch.equal(state[k], straight_state[k])]
    assert different == []
    assert metrics_rows(run_dir) == metrics_rows(straight_dir)
    assert {k: v for k, v in resumed.summary.items() if k != "train_seconds"} == \
           {k: v for k, v in straight_summary.items() if k != "train_seconds"}


def test_resuming_a_finished_run_trains_nothing_and_applies_a_new_learning_rate(straight, tmp_path):
    import shutil

    straight_dir, straight_state, straight_summary = straight
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir, run_dir)
    trainer = build(run_dir, "--iterations", "4", "--checkpoint.resume", "auto", "--optim.critic-lr", "0.0005")
    messages = []
    trainer.logger.print = trainer.checkpointer._log = messages.append
    summary = trainer.fit()
    trainer.logger.close()
    assert trainer.iteration == 4 and summary["final/eval_success_rate"] == straight_summary["final/eval_success_rate"]
    assert metrics_rows(run_dir) == metrics_rows(straight_dir)
    assert trainer.algorithm.critic_opt.param_groups[0]["lr"] == 0.0005
    assert any("critic_opt lr 0.001 in the checkpoint, 0.0005 from this run's config" in m for m in messages)
    assert any("optim.critic_lr 0.001 → 0.0005" in m for m in messages)
    state = full_state(trainer)
    assert all(torch.equal(state[k], straight_state[k]) for k in state if k.startswith(("policy.", "critic_opt.")))


def test_resume_with_another_model_shape_is_refused_naming_the_field(straight):
    straight_dir = straight[0]
    trainer = build(straight_dir, "--iterations", "6", "--checkpoint.resume", "auto", "--model.hidden-size", "32")
    with pytest.raises(CheckpointError, match=r"model.hidden_size=64 in the checkpoint but 32 now.*--log.run-dir"):
        trainer.fit()
    trainer.logger.close()
    trainer.checkpointer._uninstall_sigterm()


def test_sigterm_saves_at_the_end_of_the_iteration_and_stops(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "--iterations", "5")
    real_iterate = trainer.iterate

    def iterate_then_signal():
        metrics = real_iterate()
        if trainer.iteration == 1:  # the signal arrives during the 2nd iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(trainer, "iterate", iterate_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=r"stopped by SIGTERM after saving .*iter_000002.*--checkpoint.resume auto"):
        trainer.fit()
    trainer.logger.close()
    assert signal.getsignal(signal.SIGTERM) == previous  # handler removed again
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_000002"
    assert [r["iteration"] for r in metrics_rows(run_dir)] == [0, 1, 2]


def test_explicit_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, "--iterations", "2", "--checkpoint.save-every", "1")
    folder = run_dir / "checkpoints"
    trainer = run(run_dir, "--iterations", "2", "--checkpoint.resume", str(folder / "iter_000001"))
    assert trainer.checkpointer.resumed_from == folder / "iter_000001"
    aside = [p for p in folder.iterdir() if p.name.startswith("set-aside-")]
    assert len(aside) == 1 and [p.name for p in aside[0].iterdir()] == ["iter_000002"]  # kept, not deleted
    assert (folder / "latest").read_text().strip() == "iter_000002"  # the new iteration 2
    assert [r["iteration"] for r in metrics_rows(run_dir)] == [0, 1, 2]
