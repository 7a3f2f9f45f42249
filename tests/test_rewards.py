"""Rewards by name (fastarcher/rewards.py): every built-in reward on tricky cases, the registry, user rewards
by import path, and the finite-float contract."""
import math
from fractions import Fraction

import pytest

from fastarcher.rewards import (
    code_test_fraction,
    code_tests,
    extract_final_answer,
    get_reward,
    last_boxed,
    normalize_answer,
    parse_number,
    register_reward,
    reward_names,
    score,
)


def test_built_in_names():
    assert {"exact_match", "normalized_match", "qa_em", "qa_f1", "math_equiv"} <= set(reward_names())


@pytest.mark.parametrize("response, answer, expected", [
    ("Paris", "Paris", 1.0),
    ("  Paris\n", "Paris ", 1.0),  # surrounding whitespace only
    ("paris", "Paris", 0.0),
    ("Paris.", "Paris", 0.0),
])
def test_exact_match(response, answer, expected):
    assert score(get_reward("exact_match"), response, answer) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("The Eiffel  Tower!", "eiffel tower", 1.0),  # case, punctuation, article, spaces
    ("an apple", "Apple.", 1.0),
    ("theory", "ory", 0.0),  # "the" inside a word is no article
    ("Paris, France", "Paris", 0.0),
])
def test_normalized_match(response, answer, expected):
    assert score(get_reward("normalized_match"), response, answer) == expected


def test_normalize_answer_by_hand():
    assert normalize_answer("  The  Quick, brown FOX's tail!") == "quick brown foxs tail"


@pytest.mark.parametrize("response, answer, aliases, expected", [
    ("the Denver Broncos", "Denver Broncos", [], 1.0),
    ("Broncos", "Denver Broncos", [], 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
    ("Denver Broncos won", "Denver Broncos", [], 2 * (2 / 3) * 1.0 / (2 / 3 + 1)),  # precision 2/3, recall 1
    ("Carolina", "Denver Broncos", [], 0.0),
    ("Broncos", "Denver Broncos", ["Broncos"], 1.0),  # the best reference counts
    ("", "Denver", [], 0.0),
    ("the", "a", [], 1.0),  # both normalise to nothing
    ("a a b", "a b b", [], 2 * 1.0 * 0.5 / 1.5),  # normalised: "b" vs "b b": precision 1, recall 1/2
])
def test_qa_f1(response, answer, aliases, expected):
    assert score(get_reward("qa_f1"), response, answer, {"aliases": aliases}) == pytest.approx(expected)


def test_qa_em_uses_aliases():
    em = get_reward("qa_em")
    assert score(em, "NYC", "New York City", {"aliases": ["NYC", 5]}) == 1.0  # non-string aliases are skipped
    assert score(em, "NYC", "New York City", {}) == 0.0


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one, nested braces kept
    ("\\boxed{4", None),  # unbalanced
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("response, said", [
    ("\\boxed{4} because 2 + 2 = 4 and 5", "4"),  # the box wins over later numbers
    ("First 3, then the answer is 7 apples.\nCheck: 9", "7 apples."),
    ("I got 3 and then 7/8", "7/8"),
    ("I got 1,250 in total", "1,250"),
    ("nothing numeric", None),
])
def test_extract_final_answer(response, said):
    assert extract_final_answer(response) == said


@pytest.mark.parametrize("text, value", [
    ("42", Fraction(42)),
    ("-7", Fraction(-7)),
    ("1,250", Fraction(1250)),
    ("1{,}250", Fraction(1250)),
    ("$1,250.50", Fraction(250100, 200)),
    ("\\$3", Fraction(3)),
    ("50%", Fraction(50)),
    ("50\\%", Fraction(50)),
    ("90^\\circ", Fraction(90)),
    ("3/4", Fraction(3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("-\\dfrac{3}{4}", Fraction(-3, 4)),
    ("1 1/2", Fraction(3, 2)),
    ("0.50", Fraction(1, 2)),
    (".5", Fraction(1, 2)),
    ("12 cm", Fraction(12)),
    ("5 m/s", Fraction(5)),
    ("3 apples.", Fraction(3)),
    ("x = 5", Fraction(5)),
    ("7\\text{ dollars}", Fraction(7)),
    ("1e3", 1000.0),
    ("1,2", None),  # not a thousands separator
    ("1/0", None),
    ("five", None),
    ("", None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("response, answer, expected", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1,250}", "1250", 1.0),
    ("It costs $1,250.00 in all.", "1250", 1.0),
    ("The answer is 3/4.", "0.75", 1.0),
    ("The answer is 1 1/2", "3/2", 1.0),
    ("= 1 1/2", "3/2", 0.0),  # without a box or "answer is", the last number alone: 1/2
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("so x = 5", "5", 1.0),
    ("the answer is 12 cm", "12", 1.0),
    ("the answer is 50%", "50", 1.0),
    ("\\boxed{1e3}", "1000", 1.0),
    ("\\boxed{13}", "12", 0.0),
    ("I think 3 then 7", "7", 1.0),
    ("I think 3 then 7", "3", 0.0),
    ("\\boxed{0.333333}", "1/3", 0.0),  # exact for decimals and fractions
    ("\\boxed{12}", "\\boxed{12}", 1.0),  # a boxed reference is unwrapped
    ("The answer is paris.", "Paris", 1.0),  # non-numeric reference: normalised text
    ("The answer is lyon", "Paris", 0.0),
    ("", "4", 0.0),
    ("no number at all", "4", 0.0),
])
def test_math_equiv(response, answer, expected):
    assert score(get_reward("math_equiv"), response, answer) == expected


def test_user_rewards_by_import_path_and_by_registration(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(response, answer, fields):\n"
        "    return min(1.0, len(response) / fields['target_len'])\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("my_rewards:length_bonus")
    assert score(fn, "abc", "", {"target_len": 6}) == 0.5
    with pytest.raises(ValueError, match=r"reward.name \('my_rewards:NOT_CALLABLE'\) must name a function, not a int"):
        get_reward("my_rewards:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"cannot import module 'not_a_module'"):
        get_reward("not_a_module:f")
    with pytest.raises(ValueError, match=r"reward.name \('nope'\) must be one of .*exact_match.*'package.module:function'"):
        get_reward("nope")

    @register_reward("test_only_always_half")
    def half(response, answer, fields):
        return 0.5

    assert get_reward("test_only_always_half") is half
    with pytest.raises(ValueError, match=r"already registered"):
        register_reward("test_only_always_half")(lambda r, a, f: 1.0)
    with pytest.raises(ValueError, match=r"must be an identifier"):
        register_reward("bad name")


@pytest.mark.parametrize("value", [None, float("nan"), math.inf, "1.0"])
def test_a_reward_must_return_a_finite_float(value):
    with pytest.raises(ValueError, match=r"must return a finite float"):
        score(lambda r, a, f: value, "x", "y")
    assert score(lambda r, a, f: True, "x", "y") == 1.0


# -- code_tests: the response's code against the record's tests, in the sandbox ------------------------------

ADD_TESTS = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]}


@pytest.mark.parametrize("response, expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),                           # fenced
    ("def add(a, b):\n    return a + b", 1.0),                                            # bare code
    ("First a wrong try:\n```python\ndef add(a, b): return 0\n```\nFixed:\n```py\ndef add(a, b): return a + b\n```", 1.0),
    ("def add(a, b):\n    return a - b if a < 0 else a + b", 1 / 3),                        # 1 of 3: 'a' < 0 raises
    ("def add(a, b): return a + b\nprint('x' * 100000)", 1.0),                            # long output is no harm
    ("import sys; sys.exit(0)", 0.0),                                                     # exits before the tests
    ("def add(a, b) return a + b", 0.0),                                                  # syntax error
    ("print('FASTARCHER_TESTS_0 3')\ndef add(a, b): return None", 0.0),                   # a printed score counts for nothing
])
def test_code_tests_scores_the_fraction_of_passing_tests(response, expected):
    assert code_tests(response, "", ADD_TESTS) == pytest.approx(expected)


def test_code_tests_stops_code_that_loops_or_allocates_too_much():
    looping = "def add(a, b):\n    while True:\n        pass"
    assert code_test_fraction(looping, ["assert add(1, 2) == 3"], timeout_s=1.0) == 0.0
    hog = "blob = bytearray(2 << 30)\ndef add(a, b): return a + b"
    assert code_test_fraction(hog, ["assert add(1, 2) == 3"], timeout_s=2.0) == 0.0


def test_code_tests_needs_a_tests_field():
    with pytest.raises(ValueError, match="needs the record field 'tests'"):
        code_tests("def f(): pass", "", {})
    assert code_tests("x = 1", "", {"tests": "assert x == 1"}) == 1.0  # one string of statements
    assert get_reward("code_tests") is code_tests
