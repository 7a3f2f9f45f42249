"""End-to-end smoke test of the CLI (fastarcher/train.py): 2 ArCHer iterations under
`torchrun --standalone --nproc_per_node=2` and as a plain `python -m fastarcher.train`, checking the run folder.
"""
import json
import math

import torch
import yaml

from dist_helpers import REPO, describe, run_python, run_torchrun

torch.manual_seed(0)

NUM_ENVS = 4
TINY_FLAGS = [
    "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--algo", "archer", "--device", "cpu",
    "--iterations", "2", "--rollout.num-envs", str(NUM_ENVS), "--eval.episodes", "4", "--eval.every", "1",
    "--archer.warmup-iterations", "1", "--archer.batch-size", "4", "--archer.critic-epochs", "1",
    "--archer.actor-epochs", "1", "--replay.capacity", "64", "--model.num-layers", "1", "--critic.num-layers", "1",
    "--log.no-progress",
]

ROLLOUT_KEYS = ["rollout/return_mean", "rollout/success_rate", "rollout/episode_len", "rollout/invalid_rate"]
CRITIC_KEYS = ["critic/q_loss", "critic/v_loss", "critic/q_mean", "critic/v_mean"]
ACTOR_KEYS = ["actor/pg_loss", "actor/advantage_mean", "actor/entropy"]
TIME_KEYS = ["time/rollout_s", "time/critic_s", "time/actor_s", "time/sync_s", "time/iteration_s", "perf/tokens_per_s",
             "count/rollout_generated_tokens"]
EVAL_KEYS = ["eval/success_rate", "eval/return_mean"]


def check_run_folder(run_dir, proc) -> list[dict]:
    assert proc.returncode == 0, describe(proc)
    assert "summary" in proc.stdout + proc.stderr

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(k in rows[0] for k in EVAL_KEYS)  # evaluation before training
    for row in rows[1:]:
        missing = [k for k in ROLLOUT_KEYS + CRITIC_KEYS + TIME_KEYS + EVAL_KEYS if k not in row]
        assert not missing, (row["iteration"], missing)
        assert row["count/rollout_episodes"] == NUM_ENVS  # summed over ranks
    assert all(k in rows[2] for k in ACTOR_KEYS)  # the actor starts after 1 warm-up iteration
    assert not any(k in rows[1] for k in ACTOR_KEYS)
    assert all(math.isfinite(v) for r in rows for v in r.values())

    png = (run_dir / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["algo"], config["iterations"], config["rollout"]["num_envs"]) == ("archer", 2, NUM_ENVS)
    assert config["replay"]["max_state_len"] == 32  # from the preset

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("start/eval_success_rate", "final/eval_success_rate", "start/eval_return", "final/eval_return",
                "wall_seconds"):
        assert key in summary, key
    assert summary["final/eval_success_rate"] == rows[-1]["eval/success_rate"]

    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    assert checkpoints, "no checkpoint folder"
    assert any(f.is_file() and f.stat().st_size > 0 for c in checkpoints for f in c.rglob("*"))
    return rows


def test_cli_two_processes_under_torchrun(tmp_path):
    """Also with bf16 mixed precision and activation checkpointing (the GPU settings; plain fp32 FSDP2 runs in
    the resume and trace tests)."""
    run_dir = tmp_path / "run"
    proc = run_torchrun(["-m", "fastarcher.train", *TINY_FLAGS, "--model.mixed-precision", "bf16",
                         "--model.activation-checkpointing", "--log.run-dir", str(run_dir)], timeout=240)
    check_run_folder(run_dir, proc)


def test_cli_single_process_without_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["-m", "fastarcher.train", *TINY_FLAGS, "--log.run-dir", str(run_dir)], timeout=240)
    rows = check_run_folder(run_dir, proc)
    assert rows[1]["replay/size"] > 0
