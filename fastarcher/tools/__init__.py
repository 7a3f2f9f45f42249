"""Tools an agent calls by writing text: the protocol (`base.py`), action formats that parse a tool call
out of model output (`parse.py`), and the tools themselves (`calculator.py`, `python_exec.py`)."""
from fastarcher.tools.base import Tool, ToolCall, ToolError, run_tool
from fastarcher.tools.calculator import Calculator, evaluate_expression
from fastarcher.tools.python_exec import PythonExecutor

__all__ = ["Calculator", "PythonExecutor", "Tool", "ToolCall", "ToolError", "evaluate_expression", "run_tool"]
