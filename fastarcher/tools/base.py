"""The tool protocol: a name, a description, an argument schema, and `call(arguments) -> observation text`.

`run_tool` is the one way the trainer calls a tool: unknown tools, missing or extra arguments, wrong
argument types and exceptions inside the tool all come back as an `error: ...` observation for the
agent to read, never as a crash of the run. Observations are cut to `max_chars`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

_JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool}


class ToolError(Exception):
    """Raised by a tool for a bad call; its message is shown to the agent."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, str]
    """Argument name → JSON type ("string", "number", "integer", "boolean"); every argument is required."""

    def call(self, arguments: dict[str, Any]) -> str:
        ...


def check_arguments(tool: Tool, arguments: dict[str, Any]) -> None:
    """ToolError naming the first missing, unknown or mistyped argument."""
    for name, kind in tool.parameters.items():
        if name not in arguments:
            raise ToolError(f"{tool.name} needs argument '{name}' ({kind})")
        value = arguments[name]
        if isinstance(value, bool) and kind != "boolean" or not isinstance(value, _JSON_TYPES[kind]):
            raise ToolError(f"{tool.name} argument '{name}' must be a {kind}, got {type(value).__name__}")
    extra = sorted(set(arguments) - set(tool.parameters))
    if extra:
        raise ToolError(f"{tool.name} takes no argument '{extra[0]}' (it takes: {', '.join(tool.parameters)})")


def run_tool(tools: dict[str, Tool], call: ToolCall, max_chars: int = 1000) -> str:
    """The observation for one call: the tool's output, or `error: <reason>`; at most `max_chars`."""
    tool = tools.get(call.name)
    try:
        if tool is None:
            raise ToolError(f"unknown tool '{call.name}' (tools: {', '.join(sorted(tools))})")
        check_arguments(tool, call.arguments)
        text = str(tool.call(call.arguments))
    except ToolError as error:
        text = f"error: {error}"
    except Exception as error:  # a tool's own bug must not end the run: the agent sees it, the run goes on
        text = f"error: {call.name} failed: {type(error).__name__}: {error}"
    return text if len(text) <= max_chars else text[: max_chars - 15] + " ...[truncated]"
