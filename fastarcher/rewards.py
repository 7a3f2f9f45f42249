"""Rewards by name: functions (response, answer, fields) → float for dataset tasks.

    from fastarcher.rewards import get_reward
    reward = get_reward("math_equiv")
    reward("so the total is \\boxed{1,250}", "1250", {})     # 1.0

Built in: `exact_match` (after stripping whitespace), `normalized_match` and `qa_em` (SQuAD
normalisation: lower case, no punctuation, no articles a/an/the, single spaces), `qa_f1` (token F1
after the same normalisation), `math_equiv` (the final answer of a math response, numerically equal
to the reference), `code_tests` (the fraction of the record's `tests` that pass after the response's
code, run in the sandboxed python executor). `fields` holds the dataset record's other fields, for rewards that need them.

Your own: `get_reward("my_module:my_reward")` imports it, or `@register_reward("name")` in a module you
import first. A reward must return a finite float; `get_reward` never evaluates text.
"""
from __future__ import annotations

import collections
import math
import re
import string
from fractions import Fraction
from typing import Any, Callable

from fastarcher.imports import is_import_path, load_object

RewardFn = Callable[[str, str, dict], float]

_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward(name)`; a name is registered once."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"reward name {name!r} must be an identifier")

    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REWARDS[name].__module__})")
        _REWARDS[name] = fn
        return fn

    return add


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardFn:
    """A registered reward, or the function that `package.module:function` names."""
    if name in _REWARDS:
        return _REWARDS[name]
    if not is_import_path(name):
        raise ValueError(f"reward.name ({name!r}) must be one of {', '.join(reward_names())}, or an import path "
                         f"'package.module:function'")
    fn = load_object(name, "reward.name")
    if not callable(fn):
        raise ValueError(f"reward.name ({name!r}) must name a function, not a {type(fn).__name__}")
    return fn


def score(fn: RewardFn, response: str, answer: str, fields: dict[str, Any] | None = None) -> float:
    """`fn(response, answer, fields)` as a float, refusing what is not a finite number."""
    value = fn(response, answer, {} if fields is None else fields)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} returned {value!r}: it must return a finite float")
    return float(value)


# -- string matches -----------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@register_reward("exact_match")
def exact_match(response: str, answer: str, fields: dict) -> float:
    return float(response.strip() == answer.strip())


@register_reward("normalized_match")
def normalized_match(response: str, answer: str, fields: dict) -> float:
    return float(normalize_answer(response) == normalize_answer(answer))


@register_reward("qa_em")
def qa_em(response: str, answer: str, fields: dict) -> float:
    """Exact match after normalisation against the answer or any of `fields["aliases"]`."""
    return max(normalized_match(response, ref, fields) for ref in _references(answer, fields))


@register_reward("qa_f1")
def qa_f1(response: str, answer: str, fields: dict) -> float:
    """Token-level F1 after normalisation, best over the answer and `fields["aliases"]`."""
    return max(_token_f1(response, ref) for ref in _references(answer, fields))


def _references(answer: str, fields: dict) -> list[str]:
    aliases = fields.get("aliases") or []
    return [answer, *[a for a in aliases if isinstance(a, str)]]


def _token_f1(response: str, reference: str) -> float:
    predicted, gold = normalize_answer(response).split(), normalize_answer(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


# -- math ---------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_LAST_NUMBER = re.compile(rf"(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?")
_ANSWER_IS = re.compile(r"(?:answer|result)\s*(?:is|=|:)\s*(.+)", re.I)


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: no answer


def extract_final_answer(response: str) -> str | None:
    """What a math response answers: the last \\boxed{}, else what follows the last "answer is",
    else the last number (or fraction) in the text."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(response)
    if said:
        return said[-1].strip().splitlines()[0]
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | float | None:
    """A math answer as an exact Fraction where it can be (integers, decimals, a/b, \\frac{a}{b}, mixed
    numbers like 1 1/2), with $, thousands separators, %, degrees and trailing unit words dropped;
    float for scientific notation; None if it is no number."""
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = text.replace("{,}", ",")
    text = re.sub(r"\\(?:left|right|!|,|;|\s)", "", text)
    text = text.replace("\\$", "").replace("\\%", "").replace("%", "").replace("^\\circ", "").replace("°", "")
    text = re.sub(r"\\text\{[^{}]*\}", "", text)
    text = re.sub(r"\s*[A-Za-z][A-Za-z ./²³]*$", "", text)  # units: "12 cm", "3 apples", "5 m/s"
    text = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", text.strip().rstrip(".").strip())  # "x = 5"
    sign = -1 if text.startswith("-") else 1
    text = text[1:].strip() if text[:1] in "+-" and len(text) > 1 else text
    value = _unsigned_number(text)
    return None if value is None else sign * value


def _unsigned_number(text: str) -> Fraction | float | None:
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    match = re.fullmatch(r"\(?(\d+(?:\.\d+)?)\)?\s*/\s*\(?(\d+(?:\.\d+)?)\)?", text)
    if match:
        denominator = Fraction(match.group(2))
        return None if denominator == 0 else Fraction(match.group(1)) / denominator
    match = re.fullmatch(r"(\d+)\s+(\d+)/(\d+)", text)  # mixed number
    if match and int(match.group(3)) != 0:
        return int(match.group(1)) + Fraction(int(match.group(2)), int(match.group(3)))
    text = text.strip("()")
    if re.fullmatch(r"\d+(\.\d*)?|\.\d+", text):
        return Fraction(text)
    if re.fullmatch(r"(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+", text):
        return float(text)
    return None


def numbers_equal(a: Fraction | float, b: Fraction | float, rel_tol: float = 1e-6) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


@register_reward("math_equiv")
def math_equiv(response: str, answer: str, fields: dict) -> float:
    """1.0 when the response's final answer equals the reference as a number (exactly for integers,
    decimals and fractions), or, for non-numeric answers, as normalised text; else 0.0."""
    said = extract_final_answer(response)
    if said is None:
        return 0.0
    ref = last_boxed(answer) or answer
    expected, got = parse_number(ref), parse_number(said)
    if expected is not None:
        return float(got is not None and numbers_equal(got, expected))
    return float(normalize_answer(said) == normalize_answer(ref) != "")


# -- code run against tests in the sandbox --------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S | re.I)

_HARNESS = """\
import sys
_candidate = {code!r}
_tests = {tests!r}
_ns = {{"__name__": "__candidate__"}}
_passed = 0
try:
    exec(compile(_candidate, "<candidate>", "exec"), _ns)
except BaseException:
    _tests = []
for _test in _tests:
    try:
        exec(compile(_test, "<test>", "exec"), _ns)
        _passed += 1
    except BaseException:
        pass
sys.stdout.flush()
sys.__stderr__.write("\\n{marker} %d\\n" % _passed)
sys.__stderr__.flush()
"""


def extract_code(response: str) -> str:
    """The last fenced code block of the response (```python ... ```), else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def code_test_fraction(code: str, tests: list[str], *, timeout_s: float = 5.0) -> float:
    """The fraction of `tests` (Python statements, e.g. asserts) that run without error after `code`, in the
    sandboxed executor (fastarcher/tools/python_exec.py: a separate process with CPU, memory, file and
    wall-clock limits and no network). Code that fails to run, loops past the limit or crashes scores 0.
    The result is read from a marker with a fresh random nonce: it keeps a candidate from printing a score
    by accident, not a candidate that reads the harness on purpose (the sandbox is no security boundary)."""
    import secrets

    from fastarcher.tools.python_exec import run_python_code

    if not tests:
        return 0.0
    marker = f"FASTARCHER_TESTS_{secrets.token_hex(8)}"
    result = run_python_code(_HARNESS.format(code=code, tests=list(tests), marker=marker), timeout_s=timeout_s,
                             cpu_s=max(1, math.ceil(timeout_s)))
    found = re.findall(rf"^{marker} (\d+)$", result.stderr, re.M)
    if result.timed_out or result.returncode != 0 or not found:
        return 0.0
    return min(int(found[-1]), len(tests)) / len(tests)


@register_reward("code_tests")
def code_tests(response: str, answer: str, fields: dict) -> float:
    """The fraction of the record's `tests` (a list of Python statements, or one string of them) that pass
    after the response's code (its last ```python block, else all of it) runs in the sandbox."""
    tests = fields.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError("reward 'code_tests' needs the record field 'tests': a list of Python statements "
                         "such as \"assert add(2, 3) == 5\"")
    return code_test_fraction(extract_code(response), tests)
