"""Dialogues through a chat template (fastarcher/chat.py): the pieces read off the template rebuild the
template's own rendering of a whole conversation, s′ = s ⊕ a ⊕ o still holds token by token, the raw format
is what the built-in tokenizer gets, unusable templates are refused, and a run trains and exports with one."""
import json
import random
import subprocess
import sys

import pytest

from dist_helpers import REPO, describe, subprocess_env
from fastarcher.chat import RAW, chat_format, dialogue_format, stop_id_of
from fastarcher.envs import BatchedEnvRunner, EnvConfig
from fastarcher.model import build_builtin_tokenizer, encode
from fastarcher.rollout.collect import oracle_picker, play_episodes, random_picker

# ChatML, with a default system turn as SmolLM2-Instruct's template has.
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful agent.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template: str = CHATML):
    tokenizer = build_builtin_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


def test_pieces_rebuild_the_templates_rendering_of_a_whole_conversation():
    tokenizer = chat_tokenizer()
    fmt = chat_format(tokenizer)
    assert fmt.chat and fmt.stop_text == "<|im_end|>"
    assert fmt.prompt_head == "<|im_start|>system\nYou are a helpful agent.<|im_end|>\n<|im_start|>user\n"
    assert fmt.turn_head == "\n<|im_start|>user\n" and fmt.turn_tail == "<|im_end|>\n<|im_start|>assistant\n"
    observations, replies = ["Guess a number.\n", "higher\n", "lower"], ["8", "12"]
    assert fmt.next("higher\n") == fmt.next("higher")  # an env's closing newline is not part of the user turn
    observations = [o.rstrip("\n") for o in observations]
    messages = [{"role": "user", "content": observations[0]}]
    ids = encode(tokenizer, fmt.first(observations[0]))
    for reply, obs in zip(replies, observations[1:]):
        ids += encode(tokenizer, reply) + [stop_id_of(tokenizer, fmt)] + encode(tokenizer, fmt.next(obs))
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == rendered
    assert ids == encode(tokenizer, rendered)  # token for token, not only text


def test_a_system_prompt_replaces_the_default_one():
    fmt = chat_format(chat_tokenizer(), "Play well.")
    assert fmt.prompt_head == "<|im_start|>system\nPlay well.<|im_end|>\n<|im_start|>user\n"


def test_the_built_in_tokenizer_and_off_give_the_raw_format():
    assert dialogue_format(build_builtin_tokenizer()) == RAW
    assert dialogue_format(chat_tokenizer(), "off") == RAW and dialogue_format(chat_tokenizer(), "auto").chat
    assert RAW.first("x") == "x" == RAW.next("x") and stop_id_of(build_builtin_tokenizer(), RAW) == encode(
        build_builtin_tokenizer(), "\n")[0]
    with pytest.raises(ValueError, match="'on' but the tokenizer has no chat template"):
        dialogue_format(build_builtin_tokenizer(), "on")
    with pytest.raises(ValueError, match="system_prompt needs a chat template"):
        dialogue_format(build_builtin_tokenizer(), "auto", "Be brief.")


@pytest.mark.parametrize("template, message", [
    # the last user turn is rendered differently from earlier ones: a longer dialogue does not extend a shorter
    ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
     "{% endfor %}", "renders earlier turns differently"),
    # the assistant turn ends with plain text, not a special token
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END\n{% endfor %}", "does not start with one special token"),
    # the content is dropped
    ("{% for m in messages %}{{ m['role'] }}<|im_end|>{% endfor %}", "verbatim"),
])
def test_templates_that_cannot_be_used_incrementally_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        chat_format(chat_tokenizer(template))


@pytest.mark.parametrize("picker", ["oracle", "random"])
def test_played_dialogues_keep_s_prime_equal_s_action_obs_and_are_the_templates_rendering(picker):
    tokenizer = chat_tokenizer()
    fmt = chat_format(tokenizer)
    stop = stop_id_of(tokenizer, fmt)
    runner = BatchedEnvRunner(EnvConfig(name="guess_number"), 4)
    pick = oracle_picker if picker == "oracle" else random_picker(random.Random(0))
    result = play_episodes(runner, [1, 2, 3, 4], tokenizer=tokenizer, stop_id=stop, picker=pick, fmt=fmt)
    for episode in result.episodes:
        turns = episode.turns
        assert turns and all(t.action[-1] == stop for t in turns)
        for turn, following in zip(turns, turns[1:]):
            assert following.state == turn.state + turn.action + turn.obs
        whole = tokenizer.decode(turns[-1].state + turns[-1].action + turns[-1].obs)
        assert whole.startswith(fmt.prompt_head) and whole.endswith(fmt.turn_tail)
        assert whole.count("<|im_start|>assistant\n") == len(turns) + 1  # every reply, then the next prompt


def write_chat_model(folder):
    """The built-in policy with the ChatML tokens added, saved as a local Hugging Face folder."""
    from fastarcher.model import ModelConfig, build_builtin_model

    tokenizer = chat_tokenizer()
    model = build_builtin_model(ModelConfig(), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_run_trains_and_exports_with_the_chat_template(tmp_path):
    write_chat_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    flags = ["--config", "configs/tiny_cpu.yaml", "--model.path", str(tmp_path / "model"), "--iterations", "2",
             "--rollout.num-envs", "8", "--archer.warmup-iterations", "1", "--archer.critic-epochs", "1",
             "--archer.actor-epochs", "1", "--eval.episodes", "4", "--eval.no-random-baseline", "--log.no-progress",
             "--device", "cpu", "--rollout.context-tokens", "0", "--replay.max-state-len", "400", "--replay.max-obs-len", "64",
             "--model.system-prompt", "Reach the goal.", "--log.run-dir", str(run_dir)]
    done = subprocess.run([sys.executable, "-m", "fastarcher.train", *flags], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, describe(done)
    facts = json.loads((run_dir / "hf_policy" / "fastarcher.json").read_text())
    assert facts["chat_template"] and facts["stop_text"] == "<|im_end|>" and facts["system_prompt"] == "Reach the goal."
    assert facts["prompt_head"].startswith("<|im_start|>system\nReach the goal.<|im_end|>")
    assert "chat template" in (run_dir / "hf_policy" / "README.md").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/success_rate" in r for r in rows)


def test_an_observation_too_long_with_its_chat_turns_names_the_limit(tmp_path):
    write_chat_model(tmp_path / "model")
    done = subprocess.run([sys.executable, "-m", "fastarcher.train", "--config", "configs/tiny_cpu.yaml",
                           "--model.path", str(tmp_path / "model"), "--log.run-dir", str(tmp_path / "run")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "config error" in done.stderr and "--replay.max-obs-len" in done.stderr, describe(done)
