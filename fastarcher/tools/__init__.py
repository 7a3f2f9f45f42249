"""Tools an agent calls by writing text: the protocol (`base.py`), action formats that parse a tool call
out of model output (`parse.py`), and the tools themselves (`calculator.py`, `python_exec.py`, `retrieval.py`)."""
from fastarcher.tools.base import Tool, ToolCall, ToolError, run_tool
from fastarcher.tools.calculator import Calculator, evaluate_expression
from fastarcher.tools.python_exec import PythonExecutor
from fastarcher.tools.retrieval import Search

__all__ = ["Calculator", "PythonExecutor", "Search", "Tool", "ToolCall", "ToolError", "evaluate_expression", "run_tool"]
