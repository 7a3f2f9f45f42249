"""A diverging optimizer step through the CLI (fastarcher/guards.py, fastarcher/train.py): the run stops
with one clear line, no checkpoint holds non-finite or diverged weights, and a resume with a sane lr goes on.

Reference: the weights of every checkpoint left behind, read back with DCP's own converter.
"""
import math
import tempfile

import torch

from dist_helpers import REPO, describe, run_python

FLAGS = [
    "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--algo", "archer", "--device", "cpu",
    "--rollout.num-envs", "4", "--eval.episodes", "4", "--eval.no-random-baseline",
    "--archer.warmup-iterations", "1", "--archer.batch-size", "4", "--archer.critic-epochs", "1",
    "--archer.actor-epochs", "1", "--replay.capacity", "64", "--model.num-layers", "1", "--critic.num-layers", "1",
    "--checkpoint.save-every", "1", "--checkpoint.no-export-hf", "--log.no-progress", "--iterations", "2",
]


def largest_weight(ckpt) -> float:
    """max |w| over the policy, critic and target weights of a checkpoint (NaN if any is NaN)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt / "model"), f"{tmp}/model.pt")
        state = torch.load(f"{tmp}/model.pt", weights_only=True)
    values = [v.abs().max() for part in ("policy", "critic", "target") for v in state[part].values() if v.numel()]
    return float(torch.stack(values).max()) if not any(v.isnan() for v in values) else math.nan


def test_huge_actor_lr_stops_with_one_line_and_a_sane_resume_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    # iteration 1 is critic-only (warm-up) and saved; iteration 2's first actor step diverges
    proc = run_python(["-m", "fastarcher.train", *FLAGS, "--log.run-dir", str(run_dir), "--optim.actor-lr", "1e30"])
    assert proc.returncode != 0, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if "numerical error" in line]
    assert len(errors) == 1 and "actor parameters reach |w| =" in errors[0], describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert saved == ["iter_000001"], saved  # nothing saved after the diverged step
    assert largest_weight(run_dir / "checkpoints" / "iter_000001") < 100

    proc = run_python(["-m", "fastarcher.train", *FLAGS, "--log.run-dir", str(run_dir), "--optim.actor-lr", "1e-3",
                       "--checkpoint.resume", "auto"])
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    assert largest_weight(run_dir / "checkpoints" / "iter_000002") < 100
