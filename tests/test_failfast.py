"""No silent hang (fastarcher/train.py, dist.py, checkpoint.py, run_folder.py): a failure on one rank
ends every rank within seconds with one clear line; the run folder is locked, checked at start, and
never written by orphaned workers; SIGINT saves like SIGTERM; a fresh start keeps old metrics aside.

Reference: the exit status, wall time and output of real `torchrun --nproc_per_node=2` launches of the
CLI with the tiny preset (and, for the rank-agreement checks, this file as a 2-process worker script:
`torchrun --nproc_per_node=2 tests/test_failfast.py OUT_DIR`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny_cpu.yaml", "--device", "cpu", "--rollout.num-envs", "4", "--eval.episodes", "4",
        "--eval.every", "0", "--eval.no-random-baseline", "--archer.batch-size", "4", "--archer.critic-epochs", "1",
        "--archer.actor-epochs", "1", "--archer.warmup-iterations", "1", "--replay.capacity", "64",
        "--model.num-layers", "1", "--critic.num-layers", "1", "--checkpoint.no-export-hf", "--log.no-progress"]
"""Iterations of well under a second on one core: a run is mostly start-up."""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", COLUMNS="300", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


class Launch:
    """A `torchrun --standalone --nproc_per_node=2 -m fastarcher.train` in its own session, output in a file."""

    def __init__(self, tmp_path: Path, *flags: str, torchrun_flags: tuple[str, ...] = (),
                 script: tuple[str, ...] = ("-m", "fastarcher.train", *TINY), **env: str):
        self.log = tmp_path / f"launch-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_flags,
               *script, *flags]
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> tuple[int | None, float]:
        """(exit status or None if it was still running after `timeout` s, seconds taken); never leaves it running."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            self.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers, then kills them
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return rc, time.monotonic() - self.started

    def wait_for(self, condition, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if (self.proc.poll() is not None and not condition()) or time.monotonic() > deadline:
                self.wait(0.1)
                raise AssertionError("the run ended or stalled before the awaited state:\n" + self.output()[-4000:])
            time.sleep(0.1)


def _metric_rows(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# --------------------------------------------------------------------------------------------------
# a failure on one rank


def test_exception_on_one_rank_ends_every_rank_within_seconds_with_one_line(tmp_path):
    """Rank 1 raises after iteration 1 while rank 0 goes on into the next collective."""
    run = Launch(tmp_path, "--iterations", "50", "--log.run-dir", str(tmp_path / "run"),
                 FASTARCHER_TEST_FAULT="1:iteration")
    run.wait_for(lambda: "injected fault" in run.output(), timeout=300)
    raised = time.monotonic()
    rc, _ = run.wait(timeout=60)
    out = run.output()
    assert rc not in (None, 0), f"status {rc} {time.monotonic() - raised:.0f} s after the fault:\n{out[-4000:]}"
    assert time.monotonic() - raised < 30, out[-4000:]
    assert len(_lines_with(out, "error on rank 1: RuntimeError: injected fault at 'iteration'")) == 1, out[-4000:]
    assert len(_lines_with(out, "[rank 0] stopping: another process of the run failed")) == 1, out[-4000:]


def test_undecodable_latest_pointer_read_by_rank_0_only_does_not_hang(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00iter_\x80")
    run = Launch(tmp_path, "--iterations", "1", "--checkpoint.resume", "auto", "--log.run-dir", str(run_dir))
    rc, seconds = run.wait(timeout=240)  # seconds of work; the rest is start-up on a loaded machine
    assert rc == 0, f"status {rc} after {seconds:.0f} s:\n{run.output()[-4000:]}"
    assert [json.loads(r)["iteration"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_restart_without_the_store_variable_resumes_instead_of_hanging(tmp_path):
    """torchrun --max-restarts with its shared rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset).

    Rank 1 fails in the first attempt; in the second, rank 0 starts 5 s late, so rank 1 reaches the store
    first: it must not pick up the gloo address rank 0 left there in the first attempt."""
    late = tmp_path / "late_rank_0"
    late.mkdir()
    (late / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '0' and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '1':\n"
        "    time.sleep(5)\n")
    run = Launch(tmp_path, "--iterations", "1", "--checkpoint.resume", "auto", "--log.run-dir", str(tmp_path / "run"),
                 torchrun_flags=("--max-restarts=1",), FASTARCHER_TEST_FAULT="1:resume",
                 PYTHONPATH=f"{REPO}{os.pathsep}{late}")
    rc, seconds = run.wait(timeout=300)
    out = run.output()
    assert rc == 0, f"status {rc} after {seconds:.0f} s:\n{out[-4000:]}"
    assert "injected fault at 'resume'" in out and "summary" in out


# --------------------------------------------------------------------------------------------------
# resume decisions agreed by every rank (this file as the worker script)


def _agreement_worker(out_dir: str) -> None:
    from unittest import mock

    import fastarcher.checkpoint as ckpt
    from fastarcher.checkpoint import files as ckfiles, manager
    from fastarcher.dist import barrier
    from fastarcher.config import CheckpointConfig
    from fastarcher.dist import init_distributed, shutdown_distributed

    info = init_distributed("cpu")
    result: dict = {}
    run_dir = Path(out_dir) / "run"
    folder = run_dir / "checkpoints" / "iter_000001"
    if info.is_main:
        folder.mkdir(parents=True)
        for name in ("a.bin", "b.bin"):
            (folder / name).write_bytes(name.encode())
        files = {n: {"size": 5, "crc32": ckfiles.file_crc32(folder / n)} for n in ("a.bin", "b.bin")}
        (folder / "manifest.json").write_text(json.dumps({"format": ckpt.FORMAT_VERSION, "files": files}))
    barrier()
    checker = ckpt.Checkpointer(CheckpointConfig(resume="auto", save_on_sigterm=False), run_dir,
                                rank=info.rank, world_size=info.world_size)

    def listing_fails(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    with mock.patch.object(manager, "resume_candidates", listing_fails if info.is_main else ckfiles.resume_candidates):
        try:
            checker.resolve()
        except Exception as error:  # noqa: BLE001 - the type and message are the result
            result["listing"] = f"{type(error).__name__}: {error}"

    real_crc = ckfiles.file_crc32

    def crc_fails_on_rank_1(path):
        if info.rank == 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_crc(path)

    with mock.patch.object(ckfiles, "file_crc32", crc_fails_on_rank_1):
        try:
            result["check"] = ckpt.check_checkpoint(folder)
        except Exception as error:  # noqa: BLE001
            result["check"] = f"{type(error).__name__}: {error}"
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


def test_resume_errors_on_one_rank_are_raised_alike_on_every_rank(tmp_path):
    run = Launch(tmp_path, script=(__file__, str(tmp_path)))
    rc, _ = run.wait(timeout=180)
    assert rc is not None, "the ranks hung: one raised while the other waited in a collective"
    assert rc == 0, run.output()[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["listing"] == ranks[1]["listing"]
    assert ranks[0]["listing"].startswith("CheckpointError: ") and "Permission denied" in ranks[0]["listing"]
    assert str(tmp_path / "run" / "checkpoints") in ranks[0]["listing"]
    assert ranks[0]["check"] == ranks[1]["check"]
    assert isinstance(ranks[0]["check"], list) and len(ranks[0]["check"]) == 1
    assert "cannot be read" in ranks[0]["check"][0] and "Permission denied" in ranks[0]["check"][0]


# --------------------------------------------------------------------------------------------------
# the run folder


def test_run_lock_names_the_holder_and_is_released_on_close(tmp_path):
    from fastarcher.run_folder import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    problem = second.acquire()
    assert problem is not None and f"pid {os.getpid()}" in problem and str(tmp_path) in problem
    first.release()
    assert second.acquire() is None
    second.release()


def test_second_launch_into_a_locked_run_folder_stops_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on otherhost\n")
        held.flush()
        run = Launch(tmp_path, "--iterations", "1", "--log.run-dir", str(run_dir))
        rc, seconds = run.wait(timeout=180)
    out = run.output()
    assert rc not in (None, 0), out[-4000:]
    assert len(_lines_with(out, "pid 4242 on otherhost")) == 1, out[-4000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
    assert "fastarcher: algo=" not in out  # stopped before the model was built


@pytest.mark.parametrize("in_the_way", ["run", "run/checkpoints"])
def test_file_in_place_of_a_run_folder_stops_every_rank_at_start(tmp_path, in_the_way):
    run_dir = tmp_path / "run"
    (tmp_path / in_the_way).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / in_the_way).write_text("not a folder")
    run = Launch(tmp_path, "--iterations", "1", "--log.run-dir", str(run_dir))
    rc, seconds = run.wait(timeout=180)
    out = run.output()
    assert rc not in (None, 0), out[-4000:]
    assert len(_lines_with(out, f"{tmp_path / in_the_way} is a file, not a folder")) == 1, out[-4000:]
    assert "fastarcher: algo=" not in out  # stopped before the model was built


def test_run_folder_problems_are_found_without_writing_anything_else(tmp_path):
    from fastarcher.run_folder import run_folder_problem

    assert run_folder_problem(tmp_path / "new" / "run") is None
    assert sorted(p.name for p in (tmp_path / "new" / "run").iterdir()) == ["checkpoints"]  # no probe left behind
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in run_folder_problem(tmp_path / "file")
    assert "cannot create" in run_folder_problem(tmp_path / "file" / "run")


def test_full_disk_during_a_save_says_so(tmp_path, monkeypatch):
    import fastarcher.checkpoint as ckpt
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    cfg = parse_config([*TINY, "--iterations", "1", "--log.run-dir", str(tmp_path / "run")])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save_file", disk_full)
    where = re.escape(str(tmp_path / "run" / "checkpoints" / "iter_000000"))
    with pytest.raises(ckpt.CheckpointError, match=f"cannot save {where}: the disk is full"):
        trainer.checkpointer.save(trainer.iteration)
    trainer.logger.close()


# --------------------------------------------------------------------------------------------------
# signals and launcher death


def test_sigint_to_the_launcher_saves_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    run = Launch(tmp_path, "--iterations", "500", "--log.run-dir", str(run_dir))
    run.wait_for(lambda: _metric_rows(run_dir) >= 2, timeout=300)  # the evaluation row and iteration 1
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    rc, _ = run.wait(timeout=60)
    out = run.output()
    assert rc is not None and rc != 0, out[-4000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert re.fullmatch(r"iter_\d{6}", latest) and int(latest[5:]) >= 1, out[-4000:]
    assert len(_lines_with(out, f"stopped by SIGINT after saving {run_dir}/checkpoints/{latest}")) == 1, out[-4000:]
    assert "--checkpoint.resume auto" in out


def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    run = Launch(tmp_path, "--iterations", "500", "--log.run-dir", str(run_dir))
    run.wait_for(lambda: _metric_rows(run_dir) >= 2, timeout=300)
    workers = _children(run.proc.pid)
    assert len(workers) == 2, workers
    run.proc.kill()  # SIGKILL: torchrun cannot pass anything on
    run.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # clean up after a failure
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their launcher by 30 s:\n{run.output()[-3000:]}"


def test_other_ranks_wait_for_rank0_only_while_the_launcher_lives(monkeypatch):
    import fastarcher.dist as fdist

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    monkeypatch.setenv("RANK", "1")
    for launcher, limit, at_least in ((None, 5.0, 0.0), (-1, 5.0, 0.0), (os.getppid(), 0.5, 0.5)):
        monkeypatch.setattr(fdist, "_LAUNCHER_PID", launcher)  # None: no torchrun; -1: launcher gone
        start = time.monotonic()
        fdist.let_rank0_report_first(limit)
        waited = time.monotonic() - start
        assert at_least <= waited < at_least + 0.4, (launcher, waited)
    monkeypatch.setenv("RANK", "0")
    start = time.monotonic()
    fdist.let_rank0_report_first(5.0)
    assert time.monotonic() - start < 0.4


# --------------------------------------------------------------------------------------------------
# metrics file of a fresh start


def test_fresh_start_keeps_the_old_metrics_file_beside_the_new_one(tmp_path, monkeypatch):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    for iterations in (2, 1):
        cfg = parse_config([*TINY, "--iterations", str(iterations), "--checkpoint.resume", "none",
                            "--checkpoint.no-save-on-sigterm", "--log.run-dir", str(run_dir)])
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        trainer.fit()
        trainer.logger.close()

    def iterations_in(path: Path) -> list[int]:
        return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]

    assert iterations_in(run_dir / "metrics.jsonl") == [0, 1]
    aside = sorted(run_dir.glob("metrics.*.jsonl"))
    assert len(aside) == 1 and re.fullmatch(r"metrics\.\d{8}-\d{6}\.jsonl", aside[0].name)
    assert iterations_in(aside[0]) == [0, 1, 2]


if __name__ == "__main__":
    _agreement_worker(sys.argv[1])
