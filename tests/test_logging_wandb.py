"""W&B settings (fastarcher/logging.py): name, entity, group and tags reach `wandb.init`, and a resumed run
(same run folder) continues the same W&B run; end to end in offline mode (no network, no API key)."""
import os
import subprocess
import sys
import types

from dist_helpers import REPO, describe, subprocess_env
from fastarcher.logging import WANDB_ID_FILE, _init_wandb


def _fake_wandb(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or kw))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return calls


def test_wandb_init_gets_the_run_settings_and_keeps_one_id_per_run_folder(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    config = {"log": {"wandb_entity": "lab", "wandb_name": None, "wandb_group": "sweep1", "wandb_tags": ("a", "b")}}
    (tmp_path / "run").mkdir()
    _init_wandb(tmp_path / "run", config, "proj")
    _init_wandb(tmp_path / "run", config, "proj")
    first, second = calls
    assert first["id"] == second["id"] == (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    assert {k: first[k] for k in ("project", "entity", "name", "group", "tags", "mode", "resume")} == {
        "project": "proj", "entity": "lab", "name": "run", "group": "sweep1", "tags": ["a", "b"], "mode": "offline",
        "resume": "allow"}
    assert first["dir"] == str(tmp_path / "run") and first["config"] is config
    (tmp_path / "run" / WANDB_ID_FILE).write_text("../not an id\n")  # not what we wrote: a new run, a new id
    _init_wandb(tmp_path / "run", {"log": {"wandb_name": "mine"}}, "proj")
    assert calls[2]["id"] != first["id"] and calls[2]["name"] == "mine" and calls[2]["tags"] is None


def test_a_resumed_run_continues_the_same_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    flags = ["-m", "fastarcher.train", "--config", "configs/tiny_cpu.yaml", "--rollout.num-envs", "4", "--eval.episodes",
             "4", "--eval.every", "0", "--eval.no-random-baseline", "--archer.batch-size", "8",
             "--archer.warmup-iterations", "0", "--replay.capacity", "64", "--log.no-progress", "--device", "cpu",
             "--log.run-dir", str(run_dir), "--log.wandb", "--log.wandb-group", "g1"]
    env = {k: v for k, v in subprocess_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(WANDB_SILENT="true")
    for extra in (["--iterations", "2"], ["--iterations", "3", "--checkpoint.resume", "auto"]):
        done = subprocess.run([sys.executable, *flags, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, describe(done)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline
    assert os.path.getsize(run_dir / "wandb" / offline[1] / f"run-{run_id}.wandb") > 0
