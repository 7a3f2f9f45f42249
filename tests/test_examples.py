"""The example presets of dataset tasks (configs/arith_tools_cpu.yaml, configs/math_rlvr_traces_cpu.yaml):
their data files are what scripts/make_arith_dataset.py writes, they pass the whole config check, and each
runs end to end for two iterations (the learning curves themselves are in docs/tasks.md)."""
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import REPO, describe, run_python, subprocess_env
from fastarcher.config import load_preset
from fastarcher.train import check_config

sys.path.insert(0, str(REPO / "scripts"))
import make_arith_dataset  # noqa: E402

EXAMPLES = ["arith_tools_cpu.yaml", "math_rlvr_traces_cpu.yaml"]
DATA = {"arith_words.jsonl": [], "arith_words_val.jsonl": ["--count", "50", "--seed", "1"],
        "sums.jsonl": ["--style", "sums"]}


@pytest.mark.parametrize("name", sorted(DATA))
def test_example_data_files_are_what_the_script_writes(tmp_path, name):
    out = tmp_path / name
    make_arith_dataset.main([str(out), *DATA[name]])
    assert out.read_bytes() == (REPO / "examples" / "data" / name).read_bytes()


@pytest.mark.parametrize("preset", EXAMPLES)
def test_example_presets_pass_the_config_check(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: a preset's data paths are relative to the preset
    cfg = load_preset(preset.removesuffix(".yaml"))  # a shipped preset by name
    assert cfg.env.qa.train_files and all(Path(f).is_file() and Path(f).is_relative_to(REPO / "examples" / "data")
                                          for f in cfg.env.qa.train_files + cfg.env.qa.val_files)
    cfg.validate(world_size=1)
    check_config(cfg)


def test_preset_data_paths_are_relative_to_the_preset_and_flags_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.jsonl").write_text('{"question": "1 + 1?", "answer": 2}\n')
    (tmp_path / "presets" / "mine.yaml").write_text(
        f"env:\n  name: qa\n  qa:\n    train_files: [../data/q.jsonl]\n    corpus_files: [{tmp_path / 'c.jsonl'}]\n")
    monkeypatch.chdir(tmp_path / "presets")
    assert load_preset("mine.yaml").env.qa.train_files == ("../data/q.jsonl",)
    assert load_preset("mine.yaml").env.qa.corpus_files == (str(tmp_path / "c.jsonl"),)  # absolute: unchanged
    monkeypatch.chdir(tmp_path)
    assert load_preset("presets/mine.yaml").env.qa.train_files == ("data/q.jsonl",)
    proc = run_python(["-m", "fastarcher.train", "--config", "presets/mine.yaml", "--env.qa.train-files", "x.jsonl",
                       "--log.run-dir", str(tmp_path / "run"), "--log.no-progress"], timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "x.jsonl" in proc.stderr and "data/q.jsonl" not in proc.stderr, describe(proc)


def test_example_presets_run(tmp_path):
    quick = ["--iterations", "2", "--warm-start.steps", "2", "--rollout.num-envs", "16", "--eval.episodes", "8",
             "--eval.random-episodes", "8", "--log.no-progress", "--device", "cpu"]
    procs = {preset: subprocess.Popen([sys.executable, "-m", "fastarcher.train", "--config", f"configs/{preset}", *quick,
                                       "--log.run-dir", str(tmp_path / preset)], cwd=REPO, env=subprocess_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for preset in EXAMPLES}
    for preset, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, describe(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert (tmp_path / preset / "metrics.jsonl").is_file()
    assert (tmp_path / "math_rlvr_traces_cpu.yaml" / "influence_trace" / "steps" / "step_000000.npz").is_file()
