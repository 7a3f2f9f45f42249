"""A calculator tool: arithmetic expressions evaluated by walking their syntax tree, never by `eval`.

Allowed: numbers, + - * / // % ** (unary + and - too), parentheses, the constants pi and e, and the
functions abs, round, min, max, sqrt, log (natural, or with a base), exp, sin, cos, tan, floor, ceil.
Anything else (names, attributes, calls of other functions, strings, comprehensions, ...) is refused
before it is evaluated. Limits keep a call cheap: an expression of at most 200 characters, powers with
exponents up to 1000 and results below 1e100 in magnitude, integers below 10**100.
"""
from __future__ import annotations

import ast
import math
import operator
import warnings
from typing import Any

from fastarcher.tools.base import ToolError

MAX_CHARS = 200
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e100

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log,
              "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor,
              "ceil": math.ceil}


def _check(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError("the result is not a number")
    if isinstance(value, float) and not math.isfinite(value) or abs(value) >= MAX_MAGNITUDE:
        raise ToolError("the result is too large")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return _check(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents are limited to {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except (OverflowError, ValueError, ZeroDivisionError) as error:
            raise ToolError(str(error) or "invalid operation") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolError(f"unknown name '{node.id}'")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:30]
            raise ToolError(f"unknown function '{shown}' (functions: {', '.join(_FUNCTIONS)})")
        if node.keywords or not node.args:
            raise ToolError(f"{node.func.id} takes positional numbers only")
        args = [_eval(arg) for arg in node.args]
        try:
            return _check(_FUNCTIONS[node.func.id](*args))
        except (TypeError, ValueError, OverflowError) as error:
            raise ToolError(f"{node.func.id}: {error}") from None
    raise ToolError(f"'{type(node).__name__}' is not allowed in an expression")


def evaluate_expression(expression: str) -> int | float:
    """The value of an arithmetic expression (ToolError with a short reason when it has none)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("the expression is empty")
    if len(expression) > MAX_CHARS:
        raise ToolError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        with warnings.catch_warnings():  # "1if" and the like warn before they fail: the agent sees the error only
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ToolError("the expression does not parse") from None
    return _eval(tree)


def format_number(value: int | float) -> str:
    """Integers as integers (7.0 → 7), other floats to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


class Calculator:
    name = "calculator"
    description = "Evaluate an arithmetic expression, e.g. (3 + 4) * 2 / 7."
    parameters = {"expression": "string"}

    def call(self, arguments: dict[str, Any]) -> str:
        return format_number(evaluate_expression(arguments["expression"]))
