"""Tools a model may call mid-generation: a safe calculator and a tiny name -> tool registry.

Model output is untrusted, and even "arithmetic only" ``eval`` can be escaped (``__import__``,
attribute walks) or made to hang (``9**9**9``). So the calculator never evals: it parses with
``ast.parse(mode="eval")`` and walks the tree itself, allowing only number literals, unary ``+ -``
and binary ``+ - * / // % **``, bounded in text length, exponent, magnitude and wall time.
Tools never raise: every problem comes back as a short string starting with ``"error: "``.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

Number = int | float

_BINARY_OPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ERRORS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (ZeroDivisionError, "division by zero"),
    (OverflowError, "number too large"),
    (SyntaxError, "syntax"),  # includes IndentationError
    ((RecursionError, MemoryError), "too deeply nested"),  # the parser's or our walker's stack
)
_NUMBER_TEXT = re.compile(r"\d+(\.\d*)?|\.\d+")  # no 1e5, 0x1f, 1_000, 1j
_LINE_END = re.compile(rb"\r\n|\r|\n")  # how the parser counts lines


class _Refused(Exception):
    """Raised inside the walker; its message becomes the ``"error: ..."`` reply."""


@dataclass(frozen=True)
class _Limits:
    lines: list[bytes]  # the source's lines in UTF-8: ast positions are byte offsets into them
    max_abs: float
    max_exponent: int
    deadline: float


def _describe(node: ast.AST) -> str:
    """Say why a node that is not allowed was refused."""
    if isinstance(node, ast.Name):
        return f"name '{node.id}' is not allowed"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"operator {type(node.op).__name__} is not allowed"
    return f"{type(node).__name__.lower()} is not allowed"


def _literal(node: ast.Constant, lines: list[bytes]) -> Number:
    """Return a plain int/float literal, refusing bools, strings, complex and exotic spellings.

    The literal's text is sliced from its (single) line: ``ast.get_source_segment`` re-splits the
    whole source on every call, which makes an expression of n numbers cost O(n²)."""
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(f"constant {value!r} is not allowed")
    text = lines[node.lineno - 1][node.col_offset : node.end_col_offset].decode("utf-8", "replace")
    if not _NUMBER_TEXT.fullmatch(text):
        raise _Refused(f"number '{text}' is not allowed")
    return value


def _checked(value: object, max_abs: float) -> Number:
    """Refuse non-real, non-finite or too-large values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused("result is not a real number")
    if isinstance(value, float) and math.isnan(value):
        raise _Refused("not a number")
    if abs(value) > max_abs:
        raise _Refused("number too large")
    return value


def _evaluate(node: ast.AST, limits: _Limits) -> Number:
    """Recursively evaluate an allowed node, checking the deadline at every visit."""
    if time.perf_counter() > limits.deadline:
        raise _Refused("timeout")
    if isinstance(node, ast.Constant):
        value: object = _literal(node, limits.lines)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_evaluate(node.operand, limits))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, limits), _evaluate(node.right, limits)
        if isinstance(node.op, ast.Pow) and abs(right) > limits.max_exponent:
            raise _Refused("exponent too large")
        value = _BINARY_OPS[type(node.op)](left, right)
    else:
        raise _Refused(_describe(node))
    return _checked(value, limits.max_abs)


def _format(value: Number) -> str:
    """Integers as-is; floats rounded to 6 places, integral ones without a fraction."""
    if isinstance(value, int):
        return str(value)
    rounded = round(value, 6)
    if rounded.is_integer():
        return str(int(rounded))
    return f"{rounded:.6f}".rstrip("0").rstrip(".")


DATA_TIMEOUT_S = 10.0  # the tasks' own steps (trusted, tiny): the 0.05 s default ran out on a loaded machine, and
# a step's result must not depend on the machine's load (the next step then read "error: timeout" as its operand)


def calculate(
    expression: str,
    *,
    max_abs: float = 1e12,
    max_exponent: int = 64,
    max_length: int = 200,
    timeout_s: float = 0.05,
) -> str:
    """Evaluate an arithmetic expression safely; return the result or ``"error: ..."``, never raise."""
    try:
        deadline = time.perf_counter() + timeout_s
        if not isinstance(expression, str):
            return "error: expression must be a string"
        text = expression.strip()
        if len(text) > max_length:
            return "error: too long"
        if "#" in text or "\\" in text:  # comments and line continuations are invisible in the AST
            return "error: comments are not allowed"
        tree = ast.parse(text, mode="eval")
        lines = _LINE_END.split(text.encode("utf-8"))
        return _format(_evaluate(tree.body, _Limits(lines, max_abs, max_exponent, deadline)))
    except _Refused as exc:
        return f"error: {exc}"
    except Exception as exc:  # a tool must never raise into the rollout
        return "error: " + next((msg for kind, msg in _ERRORS if isinstance(exc, kind)), type(exc).__name__)


class ToolRegistry:
    """Named tools (``name -> fn(args) -> str``) dispatched from a model's tool-call text."""

    def __init__(self, default: str | None = None) -> None:
        self._tools: dict[str, Callable[[str], str]] = {}
        self._default = default

    def register(self, name: str, fn: Callable[[str], str]) -> None:
        """Add (or replace) a tool; names must be identifiers so ``name: args`` parses."""
        if not name.isidentifier():
            raise ValueError(f"tool name must be an identifier, got {name!r}")
        self._tools[name] = fn

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def run(self, call_text: str) -> str:
        """Run ``"name: args"``, or a bare expression with the default tool; never raise."""
        head, sep, rest = call_text.partition(":")
        if sep and head.strip().isidentifier():
            name, args = head.strip(), rest
        else:
            name, args = self._default or next(iter(self._tools), ""), call_text
        if name not in self._tools:
            return f"error: unknown tool '{name}'" if name else "error: no tools registered"
        try:
            return str(self._tools[name](args.strip()))
        except Exception as exc:  # tool failures become text for the model
            return f"error: {type(exc).__name__}"


def default_registry() -> ToolRegistry:
    """A registry with the safe calculator registered as ``"calculator"`` (the default)."""
    registry = ToolRegistry(default="calculator")
    registry.register("calculator", calculate)
    return registry
