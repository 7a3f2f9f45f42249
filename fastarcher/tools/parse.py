"""Reading a tool call or a final answer out of one model utterance, in two formats.

ReAct (`parse_react`), on separate lines or on one:

    Thought: I should add them.          (optional, ignored)
    Action: calculator
    Action Input: 2 + 3                  (text for a one-argument tool, or a JSON object)

    Action: calculator Action Input: 2 + 3
    Final Answer: 5

JSON (`parse_json_call`): `{"name": "calculator", "arguments": {"expression": "2 + 3"}}` anywhere in the
utterance (in a code fence or <tool_call> tags too; `arguments` may itself be a JSON string), or
`{"answer": "5"}`.

A call of a tool named `answer` is a final answer too (`{"name": "answer", "arguments": {"answer": "5"}}`,
`Action: answer Action Input: 5`), the way agent recipes end an episode with an answer tool.
`format_call` / `format_answer` write what the parsers read (the oracle's demonstrations).

Malformed output never raises: it comes back as `Unparsed(reason)`, which the environment shows the agent
as an observation. The first call in an utterance counts; text around it is ignored.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Union

from fastarcher.tools.base import Tool, ToolCall


@dataclass(frozen=True)
class FinalAnswer:
    text: str


@dataclass(frozen=True)
class Unparsed:
    reason: str


Parsed = Union[ToolCall, FinalAnswer, Unparsed]

# Lines or one line ("Action: calculator Action Input: 2+3"): an utterance of the trainer is one line.
_REACT_ACTION = re.compile(r"\baction[ \t]*:[ \t]*(.*?)[ \t]*(?=\baction[ \t]*input[ \t]*:|$)", re.I | re.M)
_REACT_INPUT = re.compile(r"\baction[ \t]*input[ \t]*:[ \t]*(.*)", re.I | re.S)
_REACT_FINAL = re.compile(r"\bfinal[ \t]*answer[ \t]*:[ \t]*(.*)", re.I | re.S)


def _single_argument(tool: Tool | None, text: str) -> dict | None:
    if tool is not None and len(tool.parameters) == 1:
        return {next(iter(tool.parameters)): text}
    return None


def parse_react(text: str, tools: dict[str, Tool]) -> Parsed:
    if not isinstance(text, str) or not text.strip():
        return Unparsed("empty reply: write 'Action: <tool>' and 'Action Input: ...', or 'Final Answer: ...'")
    final, action = _REACT_FINAL.search(text), _REACT_ACTION.search(text)
    if final and (action is None or final.start() < action.start()):
        answer = final.group(1).strip()
        return FinalAnswer(answer) if answer else Unparsed("'Final Answer:' is empty")
    if action is None:
        return Unparsed("no 'Action:' line and no 'Final Answer:'")
    name = action.group(1).strip().strip("`'\"").lower()
    if not name:
        return Unparsed("'Action:' names no tool")
    given = _REACT_INPUT.search(text, action.end())
    if given is None:
        return Unparsed(f"no 'Action Input:' after 'Action: {name}'")
    raw = given.group(1)
    # stop at a following Observation/Thought/Action line the model wrote itself
    raw = re.split(r"\b(?:observation|thought|action)[ \t]*:", raw, maxsplit=1, flags=re.I)[0].strip()
    raw = raw.strip("`").strip()
    if raw.startswith("{"):
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError as error:
            return Unparsed(f"'Action Input' is not valid JSON: {error.msg}")
        if not isinstance(arguments, dict):
            return Unparsed("'Action Input' JSON must be an object")
        return ToolCall(name, arguments)
    arguments = _single_argument(tools.get(name), raw)
    if name == "answer" and name not in tools:
        arguments = {"answer": raw}  # the answer tool's one argument (read as a final answer)
    if arguments is None:
        if name not in tools:
            return ToolCall(name, {})  # run_tool answers with the list of tools
        return Unparsed(f"{name} takes several arguments: give 'Action Input' as a JSON object")
    return ToolCall(name, arguments)


def _first_object(text: str) -> tuple[dict | None, str]:
    """The first JSON object in text (or the reason there is none)."""
    decoder = json.JSONDecoder()
    start, reason = text.find("{"), "no JSON object in the reply"
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            reason = f"the JSON object does not parse: {error.msg}"
        else:
            if isinstance(value, dict):
                return value, ""
        start = text.find("{", start + 1)
    return None, reason


def parse_json_call(text: str, tools: dict[str, Tool]) -> Parsed:
    if not isinstance(text, str) or not text.strip():
        return Unparsed('empty reply: write {"name": ..., "arguments": {...}} or {"answer": ...}')
    value, reason = _first_object(text)
    if value is None:
        return Unparsed(reason)
    if "answer" in value and "name" not in value:
        answer = value["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            return Unparsed('"answer" must be a non-empty string or number')
        return FinalAnswer(str(answer).strip())
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return Unparsed('the call needs "name", a tool name (or give {"answer": ...})')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # arguments encoded as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip().startswith("{") else \
                _single_argument(tools.get(name.strip()), arguments)
        except json.JSONDecodeError as error:
            return Unparsed(f'"arguments" string is not valid JSON: {error.msg}')
    if not isinstance(arguments, dict):
        return Unparsed('"arguments" must be an object')
    return ToolCall(name.strip(), arguments)


def _answer_tool(parse):
    """`parse`, reading a call of the `answer` tool as a final answer (unless a real tool is named so)."""
    def parse_with_answer_tool(text: str, tools: dict[str, Tool]) -> Parsed:
        out = parse(text, tools)
        if isinstance(out, ToolCall) and out.name.lower() == "answer" and "answer" not in tools:
            value = out.arguments.get("answer")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
                return Unparsed('the answer tool takes one argument, "answer": a non-empty string or number')
            return FinalAnswer(str(value).strip())
        return out

    parse_with_answer_tool.__name__ = parse.__name__
    return parse_with_answer_tool


ACTION_FORMATS = {"react": _answer_tool(parse_react), "json": _answer_tool(parse_json_call)}
"""Format name → parser, each reading the `answer` tool as a final answer."""


def format_call(call: ToolCall, action_format: str) -> str:
    """One line the format's parser reads back as `call` (a one-argument tool's ReAct input is the bare value)."""
    if action_format == "json":
        return json.dumps({"name": call.name, "arguments": call.arguments})
    if action_format == "react":
        if len(call.arguments) == 1 and isinstance(next(iter(call.arguments.values())), str):
            value = next(iter(call.arguments.values()))
        else:
            value = json.dumps(call.arguments)
        return f"Action: {call.name} Action Input: {value}"
    raise ValueError(f"unknown action format {action_format!r} (formats: json, react)")


def format_answer(answer: str, action_format: str) -> str:
    """One line the format's parser reads back as the final answer `answer`."""
    if action_format == "json":
        return json.dumps({"answer": answer})
    if action_format == "react":
        return f"Final Answer: {answer}"
    raise ValueError(f"unknown action format {action_format!r} (formats: json, react)")
