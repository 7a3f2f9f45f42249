"""Tools (fastarcher/tools): the calculator against hand-computed values and hostile input, tool calls that
fail becoming observations, and both action formats on well-formed and malformed utterances."""
import math

import pytest

from fastarcher.tools import Calculator, ToolCall, ToolError, evaluate_expression, run_tool
from fastarcher.tools.calculator import format_number
from fastarcher.tools.parse import FinalAnswer, Unparsed, parse_json_call, parse_react

TOOLS = {"calculator": Calculator()}


class TwoArgs:
    name, description, parameters = "lookup", "a two-argument tool", {"table": "string", "row": "integer"}

    def call(self, arguments):
        return f"{arguments['table']}[{arguments['row']}]"


class Buggy:
    name, description, parameters = "buggy", "raises", {}

    def call(self, arguments):
        raise KeyError("oops")


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", 14),
    ("(2 + 3) * 4", 20),
    ("7 / 2", 3.5),
    ("7 // 2", 3),
    ("-7 % 3", 2),
    ("2 ** 10", 1024),
    ("2^10", 1024),  # caret is power, as people write it
    ("3 × 4 ÷ 6", 2.0),
    ("-(-3)", 3),
    ("sqrt(16) + abs(-2)", 6.0),
    ("round(2.567, 2)", 2.57),
    ("max(1, 5, 3) - min(4, 2)", 3),
    ("log(8, 2)", 3.0),
    ("floor(2.7) + ceil(2.1)", 5),
    ("2 * pi", 2 * math.pi),
    ("1.5e3 + 0.5", 1500.5),
])
def test_calculator_values(expression, value):
    assert evaluate_expression(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('true')", r"unknown function '__import__\("),
    ("open('/etc/passwd')", r"unknown function 'open'"),
    ("(1).__class__", r"'Attribute' is not allowed"),
    ("x + 1", r"unknown name 'x'"),
    ("'a' * 3", r"only numbers are allowed"),
    ("[1, 2]", r"'List' is not allowed"),
    ("[x for x in range(9)]", r"'ListComp' is not allowed"),
    ("lambda: 1", r"'Lambda' is not allowed"),
    ("1 if 1 else 2", r"'IfExp' is not allowed"),
    ("True + 1", r"only numbers are allowed"),
    ("9 ** 9 ** 9", r"exponents are limited to 1000"),
    ("10 ** 200", r"the result is too large"),
    ("1e308 * 10", r"the result is too large"),
    ("1 / 0", r"division by zero"),
    ("5 % 0", r"division by zero"),
    ("sqrt(-1)", r"sqrt: math domain error"),
    ("round(x=2)", r"takes positional numbers only"),
    ("math.sqrt(4)", r"unknown function 'math.sqrt'"),
    ("2 +", r"does not parse"),
    ("", r"empty"),
    ("1+" * 150 + "1", r"longer than 200 characters"),
])
def test_calculator_refuses(expression, reason):
    with pytest.raises(ToolError, match=reason):
        evaluate_expression(expression)


def test_format_number():
    assert [format_number(v) for v in (7.0, 7, 3.5, 1 / 3, -2.0)] == ["7", "7", "3.5", "0.3333333333", "-2"]


def test_run_tool_turns_every_failure_into_an_observation():
    tools = {**TOOLS, "lookup": TwoArgs(), "buggy": Buggy()}
    assert run_tool(tools, ToolCall("calculator", {"expression": "6*7"})) == "42"
    assert run_tool(tools, ToolCall("calculator", {"expression": "1/0"})) == "error: division by zero"
    assert run_tool(tools, ToolCall("search", {})) == "error: unknown tool 'search' (tools: buggy, calculator, lookup)"
    assert run_tool(tools, ToolCall("calculator", {})) == "error: calculator needs argument 'expression' (string)"
    assert run_tool(tools, ToolCall("calculator", {"expression": 5})) == \
        "error: calculator argument 'expression' must be a string, got int"
    assert run_tool(tools, ToolCall("lookup", {"table": "t", "row": True})) == \
        "error: lookup argument 'row' must be a integer, got bool"
    assert run_tool(tools, ToolCall("lookup", {"table": "t", "row": 2, "col": 1})) == \
        "error: lookup takes no argument 'col' (it takes: table, row)"
    assert run_tool(tools, ToolCall("buggy", {})) == "error: buggy failed: KeyError: 'oops'"
    long = run_tool(tools, ToolCall("lookup", {"table": "x" * 50, "row": 1}), max_chars=20)
    assert long == "x" * 5 + " ...[truncated]" and len(long) == 20


@pytest.mark.parametrize("text, parsed", [
    ("Thought: add\nAction: calculator\nAction Input: 2 + 3", ToolCall("calculator", {"expression": "2 + 3"})),
    ("action:  Calculator \naction input: `2+3`\nObservation: 5", ToolCall("calculator", {"expression": "2+3"})),
    ('Action: calculator\nAction Input: {"expression": "1+1"}', ToolCall("calculator", {"expression": "1+1"})),
    ('Action: lookup\nAction Input: {"table": "t", "row": 3}', ToolCall("lookup", {"table": "t", "row": 3})),
    ("Final Answer: 42", FinalAnswer("42")),
    ("Thought: done.\nFinal Answer:  the answer is 5 \n", FinalAnswer("the answer is 5")),
    ("Action: search\nAction Input: cats", ToolCall("search", {})),  # run_tool lists the real tools
    ("", Unparsed("empty reply: write 'Action: <tool>' and 'Action Input: ...', or 'Final Answer: ...'")),
    ("I think it is 5", Unparsed("no 'Action:' line and no 'Final Answer:'")),
    ("Action: calculator", Unparsed("no 'Action Input:' after 'Action: calculator'")),
    ("Action:\nAction Input: 1", Unparsed("'Action:' names no tool")),
    ('Action: calculator\nAction Input: {"expression": 1+1}', Unparsed("'Action Input' is not valid JSON: Expecting ',' delimiter")),
    ("Action: lookup\nAction Input: t 3", Unparsed("lookup takes several arguments: give 'Action Input' as a JSON object")),
    ("Final Answer:", Unparsed("'Final Answer:' is empty")),
])
def test_react_format(text, parsed):
    assert parse_react(text, {**TOOLS, "lookup": TwoArgs()}) == parsed


@pytest.mark.parametrize("text, parsed", [
    ('{"name": "calculator", "arguments": {"expression": "2*3"}}', ToolCall("calculator", {"expression": "2*3"})),
    ('Sure!\n```json\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n```',
     ToolCall("calculator", {"expression": "2*3"})),
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"4\\"}"}</tool_call>',
     ToolCall("calculator", {"expression": "4"})),
    ('{"name": "calculator", "arguments": "2+2"}', ToolCall("calculator", {"expression": "2+2"})),
    ('{"answer": 12}', FinalAnswer("12")),
    ('{"oops" {"answer": "7"}', FinalAnswer("7")),  # a broken object, then a good one: the good one counts
    ('{"name": "calculator"}', ToolCall("calculator", {})),  # run_tool says which argument is missing
    ("no json here", Unparsed("no JSON object in the reply")),
    ('{"name": "calculator", "arguments": {"expression": "2"', Unparsed("the JSON object does not parse: Expecting ',' delimiter")),
    ('{"arguments": {}}', Unparsed('the call needs "name", a tool name (or give {"answer": ...})')),
    ('{"name": "calculator", "arguments": [1]}', Unparsed('"arguments" must be an object')),
    ('{"name": "calculator", "arguments": "{bad"}', Unparsed('"arguments" string is not valid JSON: Expecting property name enclosed in double quotes')),
    ('{"answer": ""}', Unparsed('"answer" must be a non-empty string or number')),
    ("", Unparsed('empty reply: write {"name": ..., "arguments": {...}} or {"answer": ...}')),
])
def test_json_format(text, parsed):
    assert parse_json_call(text, TOOLS) == parsed


def test_a_parsed_call_runs_end_to_end():
    call = parse_react("Action: calculator\nAction Input: (17 + 4) * 2", TOOLS)
    assert run_tool(TOOLS, call) == "42"
    call = parse_json_call('{"name": "calculator", "arguments": {"expression": "sqrt(2"}}', TOOLS)
    assert run_tool(TOOLS, call) == "error: the expression does not parse"


@pytest.mark.parametrize("action_format", ["json", "react"])
@pytest.mark.parametrize("call", [ToolCall("calculator", {"expression": "3 * (2 + 1)"}),
                                  ToolCall("lookup", {"query": "capital of Peru", "k": 2}),
                                  ToolCall("python", {"code": "print('a: b')"})])
def test_format_call_and_format_answer_round_trip_through_the_parser(action_format, call):
    from fastarcher.tools.parse import ACTION_FORMATS, FinalAnswer, format_answer, format_call

    class _Tool:
        def __init__(self, name, parameters):
            self.name, self.parameters, self.description = name, parameters, ""

        def call(self, arguments):
            return ""

    tools = {"calculator": _Tool("calculator", {"expression": "string"}),
             "lookup": _Tool("lookup", {"query": "string", "k": "integer"}),
             "python": _Tool("python", {"code": "string"})}
    parse = ACTION_FORMATS[action_format]
    line = format_call(call, action_format)
    assert "\n" not in line and parse(line, tools) == call
    assert parse(format_answer("3/4 cm", action_format), tools) == FinalAnswer("3/4 cm")
