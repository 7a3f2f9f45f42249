"""Environments of the user's own by import path (`--env.name pkg.module:Class`, fastarcher/envs/user.py),
with the worked example of docs/custom_env.md copied out of the page and run."""
import json
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest

from dist_helpers import REPO, describe, run_python
from fastarcher.envs import Env, EnvConfig, make_env
from fastarcher.imports import is_import_path

DOC = REPO / "docs" / "custom_env.md"


def doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/custom_env.md must hold exactly one python block: the example"
    return blocks[0]


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A folder on sys.path holding `reach_target.py` (the doc's example) and `write(name, source)` for more."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return path

    write("reach_target", doc_example())
    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_doc_example_follows_the_protocol(user_modules):
    assert len(doc_example().strip().splitlines()) <= 40  # the page promises a short example
    env = make_env(EnvConfig(name="reach_target:ReachTarget", options={"high": 9}))
    assert isinstance(env, Env) and env.name == "reach_target" and env.max_turns == 4
    assert env.reset(seed=3) == env.reset(seed=3)  # seeded
    first = env.reset(seed=3)
    target = int(first.split()[-1])
    assert first == f"at 0 of {target}\n" and 4 <= target <= 9
    # the oracle lands on the target within max_turns, and says so
    while True:
        obs, reward, done, info = env.step(env.oracle_action())
        if done:
            break
    assert (obs, reward, info["success"], info["truncated"]) == (f"at {target} of {target}\n", 1.0, True, False)
    # invalid text never raises: the state stays, the penalty and flag are set
    env.reset(seed=3)
    obs, reward, done, info = env.step("jump")
    assert (obs, reward, done, info["invalid"]) == ("invalid\n", -0.1, False, True)
    assert env.step(" +2. ")[0] == "at 2 of {}\n".format(target)  # lenient parsing
    assert env.random_valid_action(random.Random(0)) in env.action_choices()


def test_max_turns_flag_reaches_the_constructor(user_modules):
    env = make_env(EnvConfig(name="reach_target:ReachTarget", max_turns=2))
    assert env.max_turns == 2
    env.reset(seed=0)
    env.step("+1")
    assert env.step("+1")[3]["truncated"]
    with pytest.raises(ValueError, match=r"env.max_turns \(2\) and env.options.max_turns \(3\) both set"):
        make_env(EnvConfig(name="reach_target:ReachTarget", max_turns=2, options={"max_turns": 3}))


def test_options_on_the_command_line_keep_their_types(user_modules):
    from fastarcher.train import parse_config

    cfg = parse_config(["--env.name", "reach_target:ReachTarget", "--env.options", "high", "20", "max_turns", "6"])
    assert cfg.env.options == {"high": 20, "max_turns": 6}
    env = make_env(cfg.env)
    assert (env.high, env.max_turns) == (20, 6)


def test_import_path_syntax():
    assert is_import_path("pkg.mod:Cls") and is_import_path("m:C_2")
    for bad in ("frozenlake", "pkg.mod", "pkg.mod:", ":Cls", "pkg..mod:Cls", "pkg.mod:Cls.attr", "a:b:c", "1m:C"):
        assert not is_import_path(bad), bad


BROKEN = {
    "no_module_here:Env": r"cannot import module 'no_module_here'",
    "reach_target:Missing": r"module 'reach_target' has no attribute 'Missing'",
    "reach_target:TurnBasedEnv.x": r"must be one of guess_number.*or an import path",
    "reach_target:normalize_action": r"must name a class, not a function",
    "raises_on_import:Env": r"importing 'raises_on_import' raised RuntimeError: no GPU here",
    "partial:HalfEnv": r"HalfEnv lacks the env protocol's oracle_action, random_valid_action, observation_texts",
    "partial:NoChoices": r"NoChoices.action_choices\(\) must return a non-empty list of strings",
    "partial:BadTurns": r"BadTurns.max_turns \(0\) must be a positive integer",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_user_envs_are_refused_with_the_cause(user_modules, name):
    user_modules("raises_on_import", "raise RuntimeError('no GPU here')\n")
    user_modules("partial", """
        from fastarcher.envs.base import TurnBasedEnv

        class HalfEnv:
            name, max_turns = "half", 3
            def reset(self, seed): return "hi\\n"
            def step(self, text): return "hi\\n", 0.0, True, {}
            def action_choices(self): return ["a"]

        class Complete(TurnBasedEnv):
            name, max_turns = "complete", 3
            def action_choices(self): return ["a"]
            def observation_texts(self): return ["hi\\n"]
            def oracle_action(self): return "a"

        class NoChoices(Complete):
            def action_choices(self): return []

        class BadTurns(Complete):
            max_turns = 0
    """)
    with pytest.raises(ValueError, match=BROKEN[name]):
        make_env(EnvConfig(name=name))


def test_constructor_errors_name_the_options(user_modules):
    with pytest.raises(ValueError, match=r"ReachTarget\(size=3\) raised TypeError: .*unexpected keyword argument "
                                         r"'size' \(constructor arguments come from env.options\)"):
        make_env(EnvConfig(name="reach_target:ReachTarget", options={"size": 3}))


def test_options_are_refused_for_a_built_in_env():
    with pytest.raises(ValueError, match=r"env.options \(\{'high': 3\}\) are arguments for an env class of your own"):
        EnvConfig(name="frozenlake", options={"high": 3})


def test_preset_turn_limit_points_at_the_options(user_modules, tmp_path):
    from fastarcher.config import load_preset

    preset = tmp_path / "preset.yaml"
    preset.write_text("env:\n  name: reach_target:ReachTarget\n  max_turns: 5\n")
    with pytest.raises(ValueError, match=r"set env.options.max_turns in the preset instead"):
        load_preset(preset)
    preset.write_text("env:\n  name: reach_target:ReachTarget\n  options:\n    max_turns: 5\n    high: 7\n")
    assert make_env(load_preset(preset).env).max_turns == 5


def test_train_runs_the_doc_example_end_to_end(tmp_path):
    """`python -m fastarcher.train --env.name reach_target:ReachTarget` from the folder holding the module,
    as the page says; ArCHer for two iterations (critic warm-up and an actor step), then REINFORCE."""
    (tmp_path / "reach_target.py").write_text(doc_example())
    for algo, flags in (("archer", ["--archer.warmup-iterations", "1", "--archer.batch-size", "8"]), ("reinforce", [])):
        run_dir = tmp_path / f"run_{algo}"
        proc = run_python(["-m", "fastarcher.train", "--algo", algo, "--env.name", "reach_target:ReachTarget",
                           "--env.options", "high", "9", "--iterations", "2", "--rollout.num-envs", "8",
                           "--eval.episodes", "4", "--eval.every", "0", "--log.no-progress",
                           "--checkpoint.no-export-hf", "--log.run-dir", str(run_dir), *flags],
                          cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, describe(proc)
        assert "env=reach_target:ReachTarget" in proc.stdout + proc.stderr
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["iteration"] for row in rows if "rollout/success_rate" in row] == [1, 2]
        assert "actor/loss" in rows[-1] and rows[-1]["count/rollout_episodes"] == 8


def test_a_bad_user_env_stops_train_before_any_work(tmp_path):
    proc = run_python(["-m", "fastarcher.train", "--env.name", "reach_target:ReachTarget", "--iterations", "1",
                       "--log.run-dir", str(tmp_path / "run")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error: env.name ('reach_target:ReachTarget'): cannot import module"), proc.stderr
    assert not (tmp_path / "run").exists()
