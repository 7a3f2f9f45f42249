"""Config refusals (fastarcher/config.py, fastarcher/train.py): every bad config, preset or flag stops the
run before any work with one line naming the file or field, printed by rank 0 only, exit status 1.
"""
import dataclasses
import math
import random
import re

import pytest
import torch

import fastarcher.dist
import fastarcher.envs
import fastarcher.train
import fastarcher.trainer
from dist_helpers import REPO, describe, run_torchrun
from fastarcher.config import TrainConfig, load_preset
from fastarcher.envs import EnvConfig, FrozenLakeConfig, SokobanConfig, make_env
from fastarcher.model import build_builtin_tokenizer, encode
from fastarcher.train import main, parse_config

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


class TrainerMustNotBeBuilt:
    def __init__(self, *args, **kwargs):
        raise AssertionError("validation should have failed before the trainer was built")


def no_process_group(device):
    raise AssertionError("validation should have failed before the process group was set up")


@pytest.fixture
def no_trainer(monkeypatch):
    monkeypatch.setattr(fastarcher.trainer, "Trainer", TrainerMustNotBeBuilt)
    monkeypatch.setattr(fastarcher.dist, "init_distributed", no_process_group)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def check_config(cfg: TrainConfig) -> None:
    # Looked up at call time, so that this file also imports (test by test) against code without it.
    fastarcher.train.check_config(cfg)


def refusal(argv: list[str], tmp_path) -> str:
    """The one-line message main() exits with for argv (which must fail before the run folder exists)."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--log.run-dir", str(run_dir)])
    message = info.value.code
    assert isinstance(message, str) and message.startswith("config error: "), message
    assert "\n" not in message, message
    assert not run_dir.exists()
    return message


def preset(tmp_path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- preset files


@pytest.mark.parametrize("text, message", [
    ("archer:\n  batch_size: [1, 2\n", "is not valid YAML at line 3, column 1: expected ',' or ']'"),
    ("archer:\n  batch_size: 3\n gamma: 0.5\n", "is not valid YAML at line 3, column 2"),
    ("archer: {gamma: 0.5\n", "is not valid YAML"),
    ("archer:\n  gamma: 0.5\n  gamma: 0.9\n", "is not valid YAML at line 3, column 3: key 'gamma' is given twice"),
    ("iterations: !!python/object/apply:os.system ['echo pwned']\n", "is not valid YAML at line 1"),
])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path, no_trainer, capfd, text, message):
    path = preset(tmp_path, text)
    shown = refusal(["--config", path], tmp_path)
    assert f"config preset '{path}' " in shown and message in shown, shown
    assert "pwned" not in capfd.readouterr().out  # safe loading: nothing runs


@pytest.mark.parametrize("text, message", [
    ("archer: 5\n", "config key 'archer' is a section: it must hold 'archer.*' keys, got 5"),
    ("env:\n  frozenlake: slippery\n", "config key 'env.frozenlake' is a section: it must hold 'env.frozenlake.*' keys"),
    ("optim: [1, 2]\n", "config key 'optim' is a section"),
    ("iteratons: 5\n", "unknown config key 'iteratons'"),
    ("rollout:\n  engine: vllm\n", "rollout.engine ('vllm') must be one of hf, sglang"),
    ("algo: true\n", "algo (True) must be one of archer, chai, reinforce"),
    ("iterations: null\n", "config key 'iterations' must be a int like its default (100), got None"),
    ("env:\n  frozenlake:\n    map: 123\n", "config key 'env.frozenlake.map' must be a str or null, got 123"),
    ("env:\n  max_turns: oops\n", "config key 'env.max_turns' must be a int or null, got 'oops'"),
    ("optim:\n  actor_lr: .nan\n", "optim.actor_lr (nan) must be a finite number"),
])
def test_bad_preset_structure_is_refused_naming_the_key(tmp_path, no_trainer, text, message):
    assert message in refusal(["--config", preset(tmp_path, text)], tmp_path)


def test_an_empty_section_keeps_the_defaults(tmp_path):
    cfg = load_preset(preset(tmp_path, "archer:\noptim:\n  actor_lr: 0.5\n"))
    assert cfg.archer == TrainConfig().archer and cfg.optim.actor_lr == 0.5


def test_two_config_flags_are_refused(tmp_path, no_trainer):
    other = preset(tmp_path, "iterations: 3\n")
    for argv in (["--config", TINY, "--config", other], ["--config", TINY, f"--config={other}"]):
        shown = refusal(argv, tmp_path)
        assert f"--config is given 2 times ({TINY}, {other}): pass one preset" in shown, shown


# ---------------------------------------------------------------- flags


def test_missing_model_folder_is_refused_before_loading(tmp_path, no_trainer):
    shown = refusal(["--model.path", str(tmp_path / "no" / "such")], tmp_path)
    assert f"model.path ('{tmp_path / 'no' / 'such'}') is not a folder" in shown, shown
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"model.path ('{empty}') holds no config.json" in refusal(["--model.path", str(empty)], tmp_path)
    shown = refusal(["--model.path", str(empty), "--model.gguf-file", "m.gguf"], tmp_path)
    assert f"model.gguf_file ('m.gguf') is not a file in model.path ('{empty}')" in shown, shown
    shown = refusal(["--model.gguf-file", "m.gguf"], tmp_path)
    assert "model.gguf_file ('m.gguf') needs model.path" in shown


def test_model_folder_without_a_usable_tokenizer_is_one_line(tmp_path, no_trainer):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    shown = refusal(["--model.path", str(folder)], tmp_path)
    assert f"model.path ('{folder}'): cannot use its tokenizer" in shown, shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu_names_the_flag(tmp_path, no_trainer):
    shown = refusal(["--device", "cuda"], tmp_path)
    assert "device is 'cuda' but no CUDA GPU is visible: pass --device cpu" in shown
    assert "dist.device" not in shown


def test_sft_refuses_iterations_it_would_ignore(tmp_path, no_trainer):
    shown = refusal(["--algo", "sft", "--warm-start.steps", "5", "--iterations", "20"], tmp_path)
    assert "iterations has no effect with algo 'sft'" in shown and "--warm-start.steps" in shown
    assert "iterations has no effect" in refusal(["--algo=sft", "--warm-start.steps=5", "--iterations=7"], tmp_path)
    # The preset's iterations (meant for the RL algos) is not the user's flag: accepted.
    check_config(parse_config(["--config", TINY, "--algo", "sft", "--warm-start.steps", "5"]))


def test_warm_start_to_replay_needs_a_replay_buffer_and_demonstrations(tmp_path, no_trainer):
    shown = refusal(["--algo", "ppo", "--warm-start.steps", "5", "--warm-start.to-replay"], tmp_path)
    assert "warm_start.to_replay needs an algorithm with a replay buffer (archer, chai); algo 'ppo'" in shown
    shown = refusal(["--algo", "archer", "--warm-start.to-replay"], tmp_path)
    assert "set warm_start.steps > 0" in shown
    check_config(parse_config(["--config", TINY, "--algo", "chai", "--warm-start.steps", "5", "--warm-start.to-replay"]))


def test_sglang_engine_refusals_are_one_line_each(tmp_path, no_trainer):
    shown = refusal(["--rollout.engine", "sglang"], tmp_path)
    assert shown == ("config error: rollout.engine sglang samples freely (it cannot apply the action-prefix table): "
                     "add --rollout.no-constrain-actions, or use --rollout.engine hf")
    free = ["--rollout.engine", "sglang", "--rollout.no-constrain-actions", "--rollout.max-new-tokens", "4",
            "--replay.max-action-len", "5"]
    shown = refusal(free, tmp_path)
    assert shown == "config error: rollout.engine sglang needs a CUDA GPU and none is visible: use --rollout.engine hf"
    shown = refusal([*free, "--rollout.sglang-mem-fraction", "1.5"], tmp_path)
    assert shown == "config error: rollout.sglang_mem_fraction (1.5) must be in (0, 1)"


@pytest.mark.parametrize("flag, value, name", [
    ("--optim.actor-lr", "nan", "optim.actor_lr"),
    ("--optim.critic-lr", "inf", "optim.critic_lr"),
    ("--rollout.temperature", "inf", "rollout.temperature"),
    ("--rollout.top-p", "nan", "rollout.top_p"),
    ("--archer.gamma", "nan", "archer.gamma"),
    ("--archer.tau", "nan", "archer.tau"),
    ("--archer.entropy-coeff", "inf", "archer.entropy_coeff"),
    ("--optim.actor-grad-clip", "inf", "optim.actor_grad_clip"),
    ("--optim.critic-grad-clip", "nan", "optim.critic_grad_clip"),
    ("--warm-start.lr", "nan", "warm_start.lr"),
    ("--env.frozenlake.invalid-reward", "-inf", "env.frozenlake.invalid_reward"),
])
def test_non_finite_floats_are_refused_by_name(tmp_path, no_trainer, flag, value, name):
    assert f"{name} ({float(value)}) must be a finite number" in refusal([flag, value], tmp_path)


def float_fields(instance, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted name, owning dataclass, attribute) of every float field, at any depth."""
    out = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out += float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            out.append((f"{prefix}{f.name}", instance, f.name))
    return out


def test_validate_refuses_nan_and_inf_in_every_float_field():
    names = [name for name, _, _ in float_fields(TrainConfig())]
    assert {"optim.actor_lr", "archer.tau", "env.sokoban.invalid_reward", "trace.entropy.high_entropy_threshold"} <= set(names)
    for bad in (math.nan, math.inf, -math.inf):
        for index in range(len(names)):
            cfg = TrainConfig()
            name, owner, attr = float_fields(cfg)[index]
            object.__setattr__(owner, attr, bad)  # past __post_init__, as a later edit could
            with pytest.raises(ValueError, match=re.escape(f"{name} ({bad})")):
                cfg.validate()


# ---------------------------------------------------------------- config against the chosen env


def builtin_sizes(env: EnvConfig):
    tokenizer = build_builtin_tokenizer()
    return fastarcher.envs.token_sizes(env, lambda text: encode(tokenizer, text))


@pytest.mark.parametrize("env, max_obs, max_action", [
    (EnvConfig(name="frozenlake", frozenlake=FrozenLakeConfig(map="SFF/FHF/FFG", show_position=True)), 20, 2),
    (EnvConfig(name="frozenlake"), 20, 2),  # classic 4x4: 4 rows of 4 cells + newline
    (EnvConfig(name="sokoban"), 42, 2),  # 6 rows of 6 cells + newline
    (EnvConfig(name="sokoban", sokoban=SokobanConfig(width=8, height=5)), 45, 2),
    (EnvConfig(name="guess_number"), 2, 2),
])
def test_env_token_sizes_of_the_builtin_tokenizer(env, max_obs, max_action):
    sizes = builtin_sizes(env)
    assert (sizes.max_obs, sizes.max_action) == (max_obs, max_action)


@pytest.mark.parametrize("env", [
    EnvConfig(name="guess_number"), EnvConfig(name="twenty_questions"), EnvConfig(name="sokoban"),
    EnvConfig(name="frozenlake", frozenlake=FrozenLakeConfig(random_map_size=5, show_position=True)),
], ids=lambda e: e.name)
def test_declared_sizes_bound_what_random_episodes_see(env):
    tokenizer = build_builtin_tokenizer()
    sizes = builtin_sizes(env)
    game, rng, longest = make_env(env), random.Random(0), 0
    for seed in range(20):
        game.reset(seed)
        done = False
        while not done:
            action = game.random_valid_action(rng) if rng.random() < 0.8 else "nonsense"
            obs, _, done, _ = game.step(action)
            longest = max(longest, len(encode(tokenizer, obs)))
    assert 0 < longest <= sizes.max_obs
    assert max(len(encode(tokenizer, a)) + 1 for a in game.action_choices()) == sizes.max_action


def test_preset_with_another_env_names_every_limit_to_raise(tmp_path, no_trainer):
    shown = refusal(["--config", TINY, "--env.name", "sokoban"], tmp_path)
    assert ("env.name 'sokoban' has observations of up to 42 tokens and actions of up to 2 (stop token "
            "included); raise --replay.max-obs-len from 24 to 42, --rollout.context-tokens from 22 to 42, "
            "--replay.max-state-len from 32 to 42") in shown, shown
    check_config(parse_config(["--config", TINY, "--env.name", "sokoban", "--replay.max-obs-len", "42",
                               "--rollout.context-tokens", "42", "--replay.max-state-len", "42"]))


def test_context_window_shorter_than_one_observation_is_refused(tmp_path, no_trainer):
    shown = refusal(["--config", TINY, "--rollout.context-tokens", "10"], tmp_path)
    assert "raise --rollout.context-tokens from 10 to 20" in shown, shown
    check_config(parse_config(["--config", TINY, "--rollout.context-tokens", "20"]))


def test_actions_longer_than_max_new_tokens_are_refused_before_the_model(tmp_path, no_trainer):
    shown = refusal(["--config", TINY, "--env.name", "twenty_questions"], tmp_path)
    assert "env.name 'twenty_questions'" in shown and "--rollout.max-new-tokens from 4 to" in shown, shown


def test_preset_turn_limit_stays_with_its_env():
    assert parse_config(["--config", TINY]).env.env_config().max_turns == 8
    assert parse_config(["--config", TINY, "--env.name", "guess_number"]).env.env_config().max_turns == 5
    assert parse_config(["--config", TINY, "--env.max-turns", "3"]).env.env_config().max_turns == 3


def test_preset_env_max_turns_is_refused(tmp_path, no_trainer):
    shown = refusal(["--config", preset(tmp_path, "env:\n  name: frozenlake\n  max_turns: 8\n")], tmp_path)
    assert "config key 'env.max_turns' (8) in preset" in shown and "set env.frozenlake.max_turns" in shown, shown


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_fits_its_env(path):
    check_config(parse_config(["--config", str(path)]))


# ---------------------------------------------------------------- under torchrun


def test_other_ranks_exit_nonzero_without_printing(tmp_path, no_trainer, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    for argv, code in ((["--archer.gamma", "nan"], 1), (["--env.name", "chess"], 2), (["--help"], 0)):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--log.run-dir", str(tmp_path / "run")])
        assert info.value.code == code, (argv, info.value.code)
    shown = capsys.readouterr()
    assert shown.out == shown.err == ""
    assert not (tmp_path / "run").exists()


def test_two_processes_print_a_config_error_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_torchrun(["-m", "fastarcher.train", "--config", preset(tmp_path, "archer: {gamma: 0.5\n"),
                         "--log.run-dir", str(run_dir)], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, describe(proc)
    assert output.count("config error:") == 1 and "is not valid YAML" in output, describe(proc)
    assert not re.search(r'File ".*fastarcher[/\\]', output), describe(proc)  # torchrun's own report aside
    assert not run_dir.exists()
