"""The `qa` env (fastarcher/envs/qa.py): dataset questions with a reward by name, tool calls in both reply
formats, the per-epoch record order, the eval split, config checks, and training end to end with the
order continued exactly by a resume."""
import json
import random

import pytest

from dist_helpers import describe, run_python
from fastarcher.envs import EnvConfig, QAConfig, make_env, token_sizes
from fastarcher.envs.runner import BatchedEnvRunner

ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "expression": f"{a} + {b}"}
        for a, b in [(2, 3), (10, 7), (4, 4), (30, 12), (5, 9)]]


@pytest.fixture
def data(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    val = tmp_path / "val.json"
    val.write_text(json.dumps([{"question": "What is 1 + 1?", "answer": 2}, {"question": "Capital of Peru?", "answer": "Lima"}]))
    return str(train), str(val)


def qa(train, val=None, **settings) -> EnvConfig:
    return EnvConfig(name="qa", qa=QAConfig(train_files=(train,), val_files=(val,) if val else (), **settings))


def test_without_tools_the_first_reply_is_the_answer(data):
    env = make_env(qa(data[0], shuffle=False))
    assert env.max_turns == 1 and env.free_form_actions
    assert env.reset(seed=1) == "Question: What is 10 + 7?\nAnswer:\n"
    assert env.step("it is \\boxed{17}") == ("correct\n", 1.0, True, {"invalid": False, "success": True,
                                                                     "truncated": False, "turn": 1})
    env.reset(seed=1)
    assert env.step("18")[:3] == ("incorrect\n", 0.0, True)
    env.reset(seed=0)
    assert env.step(env.oracle_action())[1] == 1.0


def test_json_tool_calls_then_an_answer(data):
    env = make_env(qa(data[0], tools=("calculator",), shuffle=False, max_turns=3))
    prompt = env.reset(seed=3)
    assert prompt.startswith("Tools: calculator (expression): ") and prompt.endswith("Question: What is 30 + 12?\n")
    obs, reward, done, info = env.step('{"name": "calculator", "arguments": {"expression": "30 + 12"}}')
    assert (obs, reward, done, info["invalid"]) == ("Observation: 42\n", 0.0, False, False)
    obs, reward, done, info = env.step("I will call it")  # neither a call nor an answer
    assert obs == "error: no JSON object in the reply\n" and info["invalid"] and not done
    obs, reward, done, info = env.step('{"answer": 42}')
    assert (obs, reward, done, info["success"]) == ("correct\n", 1.0, True, True)
    # running out of turns scores 0 and is a truncation
    env.reset(seed=3)
    for _ in range(3):
        obs, reward, done, info = env.step('{"name": "calculator", "arguments": {"expression": "1/0"}}')
    assert obs == "Observation: error: division by zero\n" and done and info["truncated"] and reward == 0.0
    assert json.loads(env.oracle_action()) == {"answer": "42"}


def test_react_replies_on_one_line(data):
    env = make_env(qa(data[0], tools=("calculator",), action_format="react", shuffle=False))
    env.reset(seed=0)
    assert env.step("Action: calculator Action Input: 2 + 3")[0] == "Observation: 5\n"
    assert env.step("Final Answer: 5")[:3] == ("correct\n", 1.0, True)
    assert env.oracle_action() == "Final Answer: 5"


def test_each_epoch_is_a_new_permutation_of_the_records(data):
    env = make_env(qa(data[0]))
    questions = [r.question for r in env.train]

    def epoch(k):
        return [env.reset(seed=5 * k + i).split("\n")[0].removeprefix("Question: ") for i in range(5)]

    first, second = epoch(0), epoch(1)
    assert sorted(first) == sorted(second) == sorted(questions) and first != second
    assert epoch(0) == first  # a pure function of the seed
    assert make_env(qa(data[0], shuffle_seed=1)).record_index(0) is not None
    ordered = make_env(qa(data[0], shuffle=False))
    assert [ordered.record_index(s) for s in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_the_eval_split_reads_the_validation_files(data):
    runner = BatchedEnvRunner(qa(*data), 2, split="eval")
    prompts = runner.reset([1_000_000_007, 1_000_000_008])
    assert prompts == ["Question: Capital of Peru?\nAnswer:\n", "Question: What is 1 + 1?\nAnswer:\n"]  # seed mod 2
    train_questions = {f"Question: {r['question']}\nAnswer:\n" for r in ROWS}
    assert set(BatchedEnvRunner(qa(*data), 5).reset(list(range(5)))) == train_questions


def test_random_baseline_guesses_training_answers(data):
    env = make_env(qa(data[0]))
    guesses = {env.random_valid_action(random.Random(s)) for s in range(50)}
    assert guesses <= {r["answer"] for r in ROWS} and len(guesses) > 1


@pytest.mark.parametrize("settings, message", [
    ({"train_files": ()}, r"env.qa.train_files is empty"),
    ({"reward": "nope"}, r"reward.name \('nope'\) must be one of"),
    ({"max_turns": 0}, r"env.qa.max_turns \(0\) must be a positive integer"),
    ({"tools": ("shell",)}, r"env.qa.tools: unknown tool 'shell'"),
])
def test_bad_settings_are_refused(data, settings, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(name="qa", qa=QAConfig(**{"train_files": (data[0],), **settings}))


def test_bad_dataset_files_are_refused_naming_the_line(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer' is missing"):
        make_env(qa(str(bad)))


def test_token_sizes_of_free_form_replies(data):
    sizes = token_sizes(qa(data[0], tools=("calculator",), max_tool_chars=50), lambda text: list(text))
    assert sizes.max_action is None
    assert sizes.max_obs == max(len(make_env(qa(data[0], tools=("calculator",))).prompt(r)) for r in
                                make_env(qa(data[0])).train)  # the prompts are the longest texts here


def test_config_check_asks_for_unconstrained_decoding(data):
    from fastarcher.train import check_config, parse_config

    cfg = parse_config(["--env.name", "qa", "--env.qa.train-files", data[0]])
    with pytest.raises(ValueError, match=r"env.name 'qa' takes free-form replies, not a fixed set of actions: pass "
                                         r"--rollout.no-constrain-actions"):
        check_config(cfg)


QA_FLAGS = ["--env.name", "qa", "--env.qa.tools", "calculator", "--rollout.no-constrain-actions",
            "--rollout.max-new-tokens", "24", "--replay.max-action-len", "25", "--replay.max-obs-len", "256",
            "--rollout.num-envs", "4", "--eval.episodes", "2", "--eval.every", "0", "--eval.no-random-baseline",
            "--log.no-progress", "--checkpoint.no-export-hf", "--checkpoint.save-every", "1"]


def test_training_on_a_dataset_resumes_the_record_order_exactly(data, tmp_path):
    """Three iterations straight, and two then a resume to three: the third iteration's episodes (and so the
    records they drew) and metrics are identical."""
    flags = [*QA_FLAGS, "--env.qa.train-files", data[0], "--env.qa.val-files", data[1], "--algo", "reinforce"]

    def train(run_dir, iterations, *extra):
        proc = run_python(["-m", "fastarcher.train", *flags, "--iterations", str(iterations),
                           "--log.run-dir", str(run_dir), *extra], timeout=300)
        assert proc.returncode == 0, describe(proc)
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    straight = train(tmp_path / "a", 3)
    train(tmp_path / "b", 2)
    resumed = train(tmp_path / "b", 3, "--checkpoint.resume", "auto")
    last = [r for r in straight if r["iteration"] == 3 and "rollout/success_rate" in r]
    again = [r for r in resumed if r["iteration"] == 3 and "rollout/success_rate" in r]
    volatile = ("time/", "perf/", "tok", "seconds")
    strip = [{k: v for k, v in r.items() if not any(w in k for w in volatile)} for r in (*last, *again)]
    assert len(last) == len(again) == 1 and strip[0] == strip[1]
    assert last[0]["count/rollout_episodes"] == 4


@pytest.mark.parametrize("action_format", ["json", "react"])
def test_the_oracle_makes_the_records_tool_calls_then_answers(tmp_path, action_format):
    rows = [{**r, "tool_calls": [{"name": "calculator", "arguments": {"expression": r["expression"]}}]} for r in ROWS]
    train = tmp_path / "calls.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = make_env(qa(str(train), tools=("calculator",), action_format=action_format, shuffle=False))
    for seed, row in enumerate(ROWS):
        env.reset(seed=seed)
        call = env.oracle_action()
        assert row["expression"] in call and "\n" not in call
        obs, reward, done, _ = env.step(call)
        assert obs == f"Observation: {row['answer']}\n" and (reward, done) == (0.0, False)
        assert env.step(env.oracle_action())[1:3] == (1.0, True)
    # without tool_calls the oracle answers at once; with one turn left it answers instead of calling
    env = make_env(qa(str(train), tools=("calculator",), action_format=action_format, shuffle=False, max_turns=1))
    env.reset(seed=0)
    assert env.step(env.oracle_action())[1:3] == (1.0, True)


def test_a_malformed_tool_calls_field_is_refused_before_work(tmp_path):
    train = tmp_path / "bad.jsonl"
    train.write_text(json.dumps({"question": "q", "answer": "1", "tool_calls": [{"arguments": {}}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'tool_calls' must be a list"):
        make_env(qa(str(train), tools=("calculator",)))
    make_env(qa(str(train)))  # without tools the field is never read


@pytest.mark.parametrize("action_format", ["json", "react"])
def test_the_answer_tool_ends_the_episode(data, action_format):
    env = make_env(qa(data[0], tools=("calculator",), action_format=action_format, shuffle=False))
    env.reset(seed=1)
    reply = ('{"name": "answer", "arguments": {"answer": "17"}}' if action_format == "json"
             else "Action: answer Action Input: 17")
    assert env.step(reply)[1:3] == (1.0, True)
    env.reset(seed=1)
    empty = '{"name": "answer", "arguments": {}}' if action_format == "json" else "Action: answer Action Input: "
    obs, reward, done, info = env.step(empty)
    assert obs.startswith("error:") and not done and info["invalid"]
