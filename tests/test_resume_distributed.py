"""Exact resume with 2 processes under torchrun (FSDP2 + DCP + per-rank replay/RNG shards), crash
recovery after SIGKILL, a world-size change, and a two-node launch on localhost.

Reference: an uninterrupted 6-iteration run with the same settings. "Identical" means torch.equal on
every tensor of the final checkpoint (models, optimizers, replay shards, RNG states) and == on every
metrics.jsonl value except time/* and perf/*.

This file is also the worker script: `torchrun --nproc_per_node=2 tests/test_resume_distributed.py ROOT`.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny_cpu.yaml", "--rollout.num-envs", "8", "--eval.episodes", "8", "--eval.every", "3",
        "--eval.no-random-baseline", "--archer.batch-size", "16", "--archer.warmup-iterations", "2",
        "--replay.capacity", "512", "--log.no-progress"]
"""The settings of scripts/crash_recovery.sh (the actor first steps at iteration 3, so the checkpoint
at 3 holds both optimizers)."""


def _env() -> dict:
    # COLUMNS: rich wraps console lines at 80 columns when not on a terminal; keep log lines whole
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "COLUMNS": "500",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def checkpoint_tensors(ckpt: Path) -> dict:
    """Everything in a checkpoint as one flat dict (the DCP part merged across ranks)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt / "model"), f"{tmp}/model.pt")
        out = _flatten(torch.load(f"{tmp}/model.pt", weights_only=True), "model.")
    for part in ("replay", "rng"):
        for shard in sorted((ckpt / part).iterdir()):
            out.update({f"{part}.{shard.stem}.{k}": v for k, v in load_file(shard).items()})
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if (not torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] != b[k])]
    assert different == [], different[:10]


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


# ------------------------------------------------------------------------------------------------------
# the key test: one torchrun launch runs straight / stopped / resumed one after the other


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    done = _torchrun(str(Path(__file__)), str(root))
    return root, done.stdout + done.stderr


def test_two_process_stop_and_resume_is_bit_identical(two_process_runs):
    root, log = two_process_runs
    straight, stopped = root / "straight", root / "stopped"
    assert "checkpoint: resumed from" in log and f"{stopped}/checkpoints/iter_000003 at iteration 3" in log
    final_straight = checkpoint_tensors(straight / "checkpoints" / "iter_000006")
    final_resumed = checkpoint_tensors(stopped / "checkpoints" / "iter_000006")
    assert any(k.startswith("model.actor_opt.") for k in final_straight)  # both optimizers are compared
    assert_identical(final_straight, final_resumed)
    assert metrics_rows(straight) == metrics_rows(stopped)
    assert [r["iteration"] for r in metrics_rows(stopped)] == list(range(7))


def test_two_process_export_gathers_the_sharded_policy(two_process_runs):
    from transformers import AutoModelForCausalLM

    root, _ = two_process_runs
    exported = AutoModelForCausalLM.from_pretrained(root / "straight" / "hf_policy").state_dict()
    saved = checkpoint_tensors(root / "straight" / "checkpoints" / "iter_000006")
    tied = {"lm_head.weight": "model.embed_tokens.weight"}  # stored once in the checkpoint
    for name, value in exported.items():
        assert torch.equal(value, saved[f"model.policy.{tied.get(name, name)}"]), name


def _worker(root: str) -> None:
    from fastarcher.dist import init_distributed, shutdown_distributed
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    info = init_distributed("cpu")
    try:
        for name, iterations, resume, export in (("straight", 6, "none", "--checkpoint.export-hf"),
                                                 ("stopped", 3, "none", "--checkpoint.no-export-hf"),
                                                 ("stopped", 6, "auto", "--checkpoint.no-export-hf")):
            cfg = parse_config([*TINY, "--iterations", str(iterations), "--checkpoint.resume", resume, export,
                                "--log.run-dir", f"{root}/{name}"])
            cfg.validate(world_size=info.world_size)
            trainer = Trainer(cfg, info)
            trainer.fit()
            trainer.save_final()
            trainer.logger.close()
    finally:
        shutdown_distributed()


# ------------------------------------------------------------------------------------------------------
# slow: real process deaths and launches


@pytest.mark.slow
def test_torchrun_restart_after_sigkill_resumes_bit_identically(tmp_path):
    straight = tmp_path / "straight"
    _torchrun("-m", "fastarcher.train", *TINY, "--iterations", "6", "--checkpoint.no-export-hf",
              "--log.run-dir", str(straight))
    crashed = tmp_path / "crashed"
    done = subprocess.run(["bash", "scripts/crash_recovery.sh"], cwd=REPO, capture_output=True, text=True,
                          env={**_env(), "RUN_DIR": str(crashed)}, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report + Path(f"{crashed}.log").read_text()[-5000:]
    # how torchrun words the worker's death varies (a fresh CI run once logged no "exitcode: -9" line); that
    # the group restarted is shown by the resume from the checkpoint written before the kill
    assert "sending SIGKILL" in report
    assert f"resumed from {crashed}/checkpoints/iter_000003" in report
    assert_identical(checkpoint_tensors(straight / "checkpoints" / "iter_000006"),
                     checkpoint_tensors(crashed / "checkpoints" / "iter_000006"))
    assert metrics_rows(straight) == metrics_rows(crashed)


@pytest.mark.slow
def test_world_size_change_two_to_one_process_resumes_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    _torchrun("-m", "fastarcher.train", *TINY, "--iterations", "2", "--checkpoint.no-export-hf",
              "--log.run-dir", str(run_dir))
    before = checkpoint_tensors(run_dir / "checkpoints" / "iter_000002")
    rows_before = sum(int(before[f"replay.rank_{r:05d}.meta"][6]) for r in range(2))
    done = subprocess.run([sys.executable, "-m", "fastarcher.train", *TINY, "--iterations", "3",
                           "--checkpoint.resume", "auto", "--checkpoint.no-export-hf", "--log.run-dir", str(run_dir)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "written by 2 process(es), this run has 1" in log and "not bit-identical" in log
    after = checkpoint_tensors(run_dir / "checkpoints" / "iter_000003")
    models = ("model.policy.", "model.critic.", "model.target.", "model.critic_opt.")
    assert {k for k in after if k.startswith(models)} == {k for k in before if k.startswith(models)}
    assert json.loads((run_dir / "checkpoints" / "iter_000003" / "manifest.json").read_text())["world_size"] == 1
    meta = after["replay.rank_00000.meta"]
    assert int(meta[6]) > rows_before  # every pooled row kept (capacity 512) plus iteration 3's rows


@pytest.mark.slow
def test_two_node_launch_on_localhost_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**_env(), "RUN_DIR": str(run_dir), "PORT": "29573"}
    first = subprocess.run(["bash", "scripts/multinode_local.sh", "--iterations", "2"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + (run_dir / "node0.log").read_text()[-4000:]
    assert "ranks=2" in first.stdout and "node 0 exit 0, node 1 exit 0" in first.stdout
    second = subprocess.run(["bash", "scripts/multinode_local.sh", "--iterations", "4", "--checkpoint.resume", "auto"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + (run_dir / "node0.log").read_text()[-4000:]
    assert "resumed from" in second.stdout and "iter_000002" in second.stdout
    manifest = json.loads((run_dir / "checkpoints" / "iter_000004" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [r["iteration"] for r in metrics_rows(run_dir)] == [0, 1, 2, 3, 4]


if __name__ == "__main__":
    from fastarcher.dist import exit_now, exit_with_launcher

    exit_with_launcher()  # a timed-out test kills torchrun; its workers must not live on
    _worker(sys.argv[1])
    # done and flushed: skip the interpreter teardown, which sometimes aborts a finished torchrun worker
    # ("terminate called without an active exception"; fastarcher/train.py does the same)
    exit_now(0)
