"""Twenty Questions rules (fastarcher/envs/twenty_questions.py) against its attribute table."""
import pytest
import torch

from fastarcher.envs import EnvConfig, TwentyQuestions, TwentyQuestionsConfig
from fastarcher.envs.evaluate import evaluate_policy
from fastarcher.envs.twenty_questions import OBJECTS, QUESTIONS, guess_text

torch.manual_seed(0)


def env_with_target(name: str, cfg: TwentyQuestionsConfig | None = None) -> TwentyQuestions:
    """A reset env hiding `name` (found by scanning seeds)."""
    env = TwentyQuestions(cfg)
    for seed in range(10_000):
        env.reset(seed)
        if env.target == name:
            return env
    raise AssertionError(f"no seed hides {name}")


def test_table_sizes_and_every_object_is_identifiable_by_questions_alone():
    assert 20 <= len(OBJECTS) <= 40 and 15 <= len(QUESTIONS) <= 25
    vectors = {name: tuple(attr in attrs for attr in QUESTIONS) for name, attrs in OBJECTS.items()}
    assert len(set(vectors.values())) == len(OBJECTS)
    for name, attrs in OBJECTS.items():
        assert attrs <= set(QUESTIONS), (name, attrs - set(QUESTIONS))
    for attr in QUESTIONS:  # every question is informative over the whole table
        assert 0 < sum(attr in attrs for attrs in OBJECTS.values()) < len(OBJECTS)


def test_choices_are_questions_then_guesses():
    env = TwentyQuestions()
    choices = env.action_choices()
    assert choices[: len(QUESTIONS)] == list(QUESTIONS.values())
    assert choices[len(QUESTIONS):] == [guess_text(name) for name in OBJECTS]
    assert guess_text("dog") == "Is it a dog?" and guess_text("apple") == "Is it an apple?"
    assert env.reset(0) == "Find the hidden object with yes/no questions.\n"


@pytest.mark.parametrize("name", list(OBJECTS))
def test_answers_match_attribute_table(name):
    for attr, question in QUESTIONS.items():
        env = env_with_target(name)
        obs, reward, done, info = env.step(question)
        assert obs == ("Yes\n" if attr in OBJECTS[name] else "No\n"), (name, question)
        assert (reward, done, info["invalid"], info["success"]) == (-1.0, False, False, False)


def test_hand_checked_answers():
    env = env_with_target("elephant")
    assert env.step("Is it an animal?")[0] == "Yes\n"
    assert env.step("Can it fly?")[0] == "No\n"
    assert env.step("Is it bigger than a car?")[0] == "Yes\n"
    env = env_with_target("bicycle")
    assert env.step("Does it have an engine?")[0] == "No\n"
    assert env.step("Does it have wheels?")[0] == "Yes\n"


def test_wrong_guess_is_no_and_right_guess_ends_with_zero_reward():
    env = env_with_target("cat")
    assert env.step("Is it a dog?") == ("No\n", -1.0, False, {"invalid": False, "success": False, "truncated": False, "turn": 1})
    obs, reward, done, info = env.step("Is it a cat?")
    assert (obs, reward, done, info["success"]) == ("Yes\n", 0.0, True, True)


@pytest.mark.parametrize("text", ["is it an ANIMAL", "  Is it animal ?  ", "IS IT A DOG!", "is it the dog", "Is it a  dog"])
def test_parsing_ignores_case_punctuation_spacing_and_articles(text):
    env = env_with_target("dog")
    obs, reward, done, info = env.step(text)
    assert obs == "Yes\n" and not info["invalid"]


@pytest.mark.parametrize("text", ["Is it a unicorn?", "dog", "Is it alive?", "", "Yes", "Is it an animal? Is it a dog?"])
def test_unknown_text_answers_invalid(text):
    env = env_with_target("dog")
    obs, reward, done, info = env.step(text)
    assert (obs, reward, done, info["invalid"]) == ("Invalid\n", -1.0, False, True)
    assert len(env.candidates) == len(OBJECTS)  # nothing learned


def test_twenty_turns_then_done_with_return_minus_twenty():
    env = env_with_target("clock")
    results = [env.step("Is it an animal?") for _ in range(20)]
    assert [r[2] for r in results] == [False] * 19 + [True]
    assert sum(r[1] for r in results) == -20.0 and results[-1][3]["truncated"]


def test_candidates_follow_answers():
    env = env_with_target("banana")
    env.step("Is it food?")
    assert set(env.candidates) == {n for n, a in OBJECTS.items() if "food" in a}
    env.step("Is it sweet?")
    assert set(env.candidates) == {"apple", "banana", "cake"}
    env.step("Is it an apple?")
    assert set(env.candidates) == {"banana", "cake"}


@pytest.mark.parametrize("name", list(OBJECTS))
def test_oracle_finds_every_object_and_keeps_it_among_candidates(name):
    env = env_with_target(name)
    done, turns = False, 0
    while not done:
        action = env.oracle_action()
        obs, reward, done, info = env.step(action)
        turns += 1
        assert name in env.candidates
    assert info["success"] and turns <= 8, (name, turns)


def test_oracle_first_question_splits_most_evenly_and_guesses_among_two():
    env = TwentyQuestions()
    env.reset(0)
    n = len(OBJECTS)
    best = max(min(k, n - k) for k in (sum(a in attrs for attrs in OBJECTS.values()) for a in QUESTIONS))
    first = env.oracle_action()
    attr = next(a for a, q in QUESTIONS.items() if q == first)
    assert min(sum(attr in v for v in OBJECTS.values()), n - sum(attr in v for v in OBJECTS.values())) == best
    env = env_with_target("banana")
    env.step("Is it sweet?")
    env.step("Is it a fruit?")  # apple or banana left
    assert env.oracle_action() in (guess_text("apple"), guess_text("banana"))


def test_num_objects_limits_targets_and_guesses():
    cfg = TwentyQuestionsConfig(num_objects=4)
    env = TwentyQuestions(cfg)
    names = list(OBJECTS)[:4]
    assert env.action_choices()[len(QUESTIONS):] == [guess_text(n) for n in names]
    seen = set()
    for seed in range(100):
        env.reset(seed)
        seen.add(env.target)
    assert seen == set(names)


def test_random_policy_matches_closed_form():
    # Uniform choice among 25 questions + 36 guesses; only the right guess wins:
    # P(success in 20 turns) = 1 - (60/61)^20 = 0.2810.
    n_choices = len(QUESTIONS) + len(OBJECTS)
    expected = 1 - ((n_choices - 1) / n_choices) ** 20
    result = evaluate_policy(EnvConfig(name="twenty_questions"), "random", episodes=2000, seed=0)
    assert abs(result["success_rate"] - expected) < 0.03
