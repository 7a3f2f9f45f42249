"""Config and CLI (fastarcher/config.py, fastarcher/train.py): tyro help, YAML presets with flag overrides,
and validation that fails before any work with a message naming the field.
"""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import fastarcher.dist
import fastarcher.trainer
from dist_helpers import REPO, describe, run_python
from fastarcher.config import TrainConfig, load_preset
from fastarcher.dist import DistInfo
from fastarcher.train import main, parse_config, preset_path

torch.manual_seed(0)

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def leaf_flags(instance, prefix: str = "") -> dict[str, object]:
    """--dotted.flag-name → default value, for every non-dataclass field (recursively)."""
    flags = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        name = f"{prefix}{f.name.replace('_', '-')}"
        if dataclasses.is_dataclass(value):
            flags.update(leaf_flags(value, name + "."))
        else:
            flags["--" + name] = value
    return flags


def help_entries(text: str) -> dict[str, str]:
    """tyro's boxed help → {flag: description (whitespace collapsed)}."""
    entries, current = {}, []
    for raw in text.splitlines():
        line = raw.strip().strip("│").strip()
        if raw.strip().startswith(("╭", "╰")) or line.startswith("─"):
            current = []
            continue
        if line.startswith("--"):
            current = re.findall(r"(?:^|, )(--[\w.-]+)", line)  # a flag and its aliases
            entries.update({flag: "" for flag in current})
        else:
            for flag in current:
                entries[flag] = (entries[flag] + " " + line).strip()
    return {flag: re.sub(r"\s+", " ", desc) for flag, desc in entries.items()}


@pytest.fixture(scope="module")
def help_text():
    proc = run_python(["-m", "fastarcher.train", "--help"], timeout=120)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout


def test_help_lists_every_flag_with_default_and_description(help_text):
    entries = help_entries(help_text)
    flags = leaf_flags(TrainConfig())
    assert len(flags) > 60  # the whole nested config, not only the top level
    for flag, default in flags.items():
        assert flag in entries, f"{flag} missing from --help"
        desc = entries[flag]
        assert "(default:" in desc, (flag, desc)
        if isinstance(default, (bool, int, float, str)):
            assert f"(default: {default})" in desc or f"(default: {str(default).lower()})" in desc, (flag, desc)
        text = desc.split("(default:")[0].strip()
        assert len(text) >= 10, f"{flag} has no description: {desc!r}"


def test_help_shows_known_defaults_and_descriptions(help_text):
    entries = help_entries(help_text)
    assert entries["--replay.capacity"] == "Transitions kept per rank (oldest overwritten first). (default: 100000)"
    assert entries["--algo"].startswith("Algorithm (docs/algorithms.md): archer")
    assert entries["--algo"].endswith("(default: archer)")
    assert "(default: 0.99)" in entries["--archer.gamma"]
    assert "--log.progress, --log.no-progress" in help_text


def test_help_with_a_preset_shows_the_preset_values_as_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        parse_config(["--config", TINY, "--help"])
    assert info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert entries["--replay.capacity"].endswith("(default: 20000)")
    assert entries["--iterations"].endswith("(default: 250)")


# ---------------------------------------------------------------- presets and overrides


def test_preset_path_reads_both_spellings():
    assert preset_path(["--x", "1", "--config", "a.yaml"]) == "a.yaml"
    assert preset_path(["--config=b.yaml", "--x", "1"]) == "b.yaml"
    assert preset_path(["--x", "1"]) is None


def test_preset_values_replace_defaults_and_keep_the_rest():
    cfg = parse_config(["--config", TINY])
    assert (cfg.iterations, cfg.rollout.num_envs, cfg.replay.capacity) == (250, 128, 20000)
    assert cfg.archer.warmup_iterations == 30 and cfg.rollout.context_tokens == 22
    assert cfg.archer.batch_size == 32 and cfg.replay.max_state_len == 32
    assert cfg.env.name == "frozenlake" and cfg.env.frozenlake.map == "SFF/FHF/FFG"
    assert cfg.archer.gamma == TrainConfig().archer.gamma  # not in the preset: built-in default
    assert cfg.config == TINY


@pytest.mark.parametrize("argv", [
    ["--config", TINY, "--rollout.num-envs", "8", "--archer.batch-size=16", "--algo", "reinforce"],
    ["--rollout.num-envs", "8", "--algo", "reinforce", "--config", TINY, "--archer.batch-size", "16"],
    [f"--config={TINY}", "--rollout.num-envs=8", "--archer.batch-size", "16", "--algo=reinforce"],
])
def test_cli_flags_override_the_preset_in_any_order(argv):
    cfg = parse_config(argv)
    assert (cfg.rollout.num_envs, cfg.archer.batch_size, cfg.algo) == (8, 16, "reinforce")
    assert cfg.replay.capacity == 20000 and cfg.iterations == 250  # untouched preset values


def test_nested_yaml_merges_only_the_given_fields(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("env:\n  name: frozenlake\n  frozenlake:\n    slippery: true\noptim:\n  critic_lr: 0.01\n")
    cfg = load_preset(preset)
    assert cfg.env.name == "frozenlake" and cfg.env.frozenlake.slippery is True
    assert cfg.env.frozenlake.max_turns == TrainConfig().env.frozenlake.max_turns
    assert cfg.optim.critic_lr == 0.01 and cfg.optim.actor_lr == TrainConfig().optim.actor_lr


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_preset(preset)
    cfg.validate(world_size=1)


# ---------------------------------------------------------------- validation before any work


class TrainerMustNotBeBuilt:
    def __init__(self, *args, **kwargs):
        raise AssertionError("validation should have failed before the trainer was built")


@pytest.fixture
def no_trainer(monkeypatch):
    monkeypatch.setattr(fastarcher.trainer, "Trainer", TrainerMustNotBeBuilt)


def config_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, str), info.value.code
    return info.value.code


@pytest.mark.parametrize("flags, message", [
    (["--replay.capacity=-5"], "replay.capacity (-5) must be positive"),
    (["--archer.batch-size", "64", "--replay.capacity", "32"],
     "archer.batch_size (64) must not exceed replay.capacity (32)"),
    (["--rollout.top-p", "1.5"], "rollout.top_p (1.5) must be in (0, 1]"),
    (["--iterations", "0"], "iterations (0) must be positive"),
    (["--archer.gamma", "1.5"], "archer.gamma (1.5) must be in [0, 1]"),
    (["--rollout.max-new-tokens", "32"], "replay.max_action_len (16) must be at least rollout.max_new_tokens (32)"),
    (["--rollout.no-constrain-actions"],
     "replay.max_action_len (16) must be at least rollout.max_new_tokens + 1 (17) when rollout.constrain_actions is off"),
    (["--rollout.context-tokens", "600"], "rollout.context_tokens (600) must not exceed replay.max_state_len (512)"),
    (["--rollout.context-tokens=-1"], "rollout.context_tokens (-1) must not be negative"),
    (["--model.hidden-size", "30"], "model.hidden_size (30) must be divisible by model.num_heads (4)"),
    (["--config", "configs/does_not_exist.yaml"], "config preset 'configs/does_not_exist.yaml' does not exist"),
])
def test_bad_values_fail_before_any_work_naming_the_field(tmp_path, no_trainer, capsys, flags, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([*flags, "--log.run-dir", str(run_dir)])
    shown = info.value.code if isinstance(info.value.code, str) else capsys.readouterr().err
    assert message in re.sub(r"[\s│]+", " ", shown), shown
    assert not run_dir.exists()


def test_unknown_env_name_on_the_command_line_lists_the_choices(tmp_path, no_trainer, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--env.name", "chess", "--log.run-dir", str(tmp_path / "run")])
    assert info.value.code == 2
    err = re.sub(r"[\s│]+", " ", capsys.readouterr().err)
    assert "env.name ('chess') must be one of guess_number" in err and "'package.module:ClassName'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("env:\n  name: chess\n", "env.name ('chess') must be one of guess_number, twenty_questions"),
    ("archer:\n  batch_sise: 3\n", "unknown config key 'archer.batch_sise'"),
    ("replay:\n  capacity: -1\n", "replay.capacity (-1) must be positive"),
    ("- just\n- a list\n", "must hold a mapping of fields"),
    ("replay:\n  capacity: big\n", "config key 'replay.capacity' must be a int like its default (100000), got 'big'"),
    ("log:\n  wandb: 1\n", "config key 'log.wandb' must be a bool"),
    ("archer:\n  batch_size: 2.5\n", "config key 'archer.batch_size' must be a int"),
])
def test_bad_preset_files_fail_naming_the_field(tmp_path, no_trainer, yaml_text, message):
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml_text)
    error = config_error(["--config", str(preset), "--log.run-dir", str(tmp_path / "run")])
    assert message in error, error
    assert not (tmp_path / "run").exists()


def test_num_envs_must_divide_over_the_processes(tmp_path, no_trainer, monkeypatch):
    # Validation runs before the process group exists: the world size comes from torchrun's environment.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(fastarcher.dist, "init_distributed",
                        lambda device: DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    error = config_error(["--rollout.num-envs", "5", "--log.run-dir", str(tmp_path / "run")])
    assert error == "config error: rollout.num_envs (5) must be divisible by the number of processes (2)"
    error = config_error(["--rollout.num-envs", "6", "--eval.episodes", "3", "--log.run-dir", str(tmp_path / "run")])
    assert "eval.episodes (3) must be divisible by the number of processes (2)" in error
    assert not (tmp_path / "run").exists()


def test_validate_accepts_the_defaults_and_divisible_world_sizes():
    cfg = TrainConfig()
    cfg.validate(world_size=1)
    cfg.validate(world_size=2)
    parse_config(["--rollout.no-constrain-actions", "--replay.max-action-len", "17"]).validate()
    with pytest.raises(ValueError, match=r"rollout.num_envs \(50\) must be divisible by the number of processes \(3\)"):
        cfg.validate(world_size=3)


def test_cli_config_error_exits_nonzero_with_the_message(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["-m", "fastarcher.train", "--replay.capacity=-5", "--log.run-dir", str(run_dir),
                       "--log.no-progress"], timeout=120)
    assert proc.returncode == 1, describe(proc)
    assert "config error: replay.capacity (-5) must be positive" in proc.stderr
    assert not Path(run_dir).exists()


def test_shipped_presets_load_by_name_from_any_folder(tmp_path, monkeypatch):
    from fastarcher.config import resolve_preset, shipped_presets

    monkeypatch.chdir(tmp_path)  # not the repository root
    assert {"tiny_cpu", "math_rlvr_traces_cpu"} <= set(shipped_presets())
    assert resolve_preset("tiny_cpu") == resolve_preset("configs/tiny_cpu.yaml") == REPO / "configs" / "tiny_cpu.yaml"
    assert load_preset("tiny_cpu") == dataclasses.replace(load_preset(REPO / "configs" / "tiny_cpu.yaml"),
                                                        config=str(REPO / "configs" / "tiny_cpu.yaml"))
    (tmp_path / "tiny_cpu.yaml").write_text("iterations: 7\n")  # a file given by path wins over the name
    assert load_preset("tiny_cpu.yaml").iterations == 7 and load_preset("tiny_cpu").iterations == 250
    with pytest.raises(ValueError, match=r"'tiny' does not exist: .*shipped preset by name \(.*tiny_cpu"):
        load_preset("tiny")


def test_dataset_flags_have_agentfly_style_aliases():
    long = parse_config(["--env.name", "qa", "--env.qa.train-files", "a.jsonl", "b.json", "--env.qa.val-files", "v.jsonl",
                         "--env.qa.reward", "qa_f1"])
    short = parse_config(["--env.name", "qa", "--data.train-files", "a.jsonl", "b.json", "--data.val-files", "v.jsonl",
                          "--reward.name", "qa_f1"])
    assert short == long and short.env.qa.train_files == ("a.jsonl", "b.json") and short.env.qa.reward == "qa_f1"
