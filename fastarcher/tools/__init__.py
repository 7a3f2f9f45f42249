"""Tools an agent calls by writing text: the protocol (`base.py`), action formats that parse a tool call
out of model output (`parse.py`), and the tools themselves (`calculator.py`)."""
from fastarcher.tools.base import Tool, ToolCall, ToolError, run_tool
from fastarcher.tools.calculator import Calculator, evaluate_expression

__all__ = ["Calculator", "Tool", "ToolCall", "ToolError", "evaluate_expression", "run_tool"]
