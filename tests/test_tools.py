"""Specs for the safe calculator tool and the tool registry."""

from __future__ import annotations

import time

import pytest

from posttrain.tools import ToolRegistry, calculate, default_registry


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("7//2", "3"),
        ("7%4", "3"),
        ("2**10", "1024"),
        ("-3+5", "2"),
        ("+4", "4"),
        ("10/4", "2.5"),
        ("6/3", "2"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("1.5*2", "3"),
        (" 12 - 30 ", "-18"),
        ("2**-2", "0.25"),
        ("-7//2", "-4"),
        (".5+.25", "0.75"),
        ("1/3000000", "0"),
    ],
)
def test_calculates_exact_strings(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("x+1", "error: name 'x' is not allowed"),
        ("__import__('os')", "error: call is not allowed"),
        ("(1).real", "error: attribute is not allowed"),
        ("abs(-1)", "error: call is not allowed"),
        ("'a'*3", "error: constant 'a' is not allowed"),
        ("1 < 2", "error: compare is not allowed"),
        ("True+1", "error: constant True is not allowed"),
        ("1j*2", "error: constant 1j is not allowed"),
        ("[1][0]", "error: subscript is not allowed"),
        ("(lambda: 1)", "error: lambda is not allowed"),
        ("[i for i in (1, 2)]", "error: listcomp is not allowed"),
        ("1 and 2", "error: boolop is not allowed"),
        ("3^1", "error: operator BitXor is not allowed"),
        ("~1", "error: operator Invert is not allowed"),
        ("1e5", "error: number '1e5' is not allowed"),
        ("1_000+1", "error: number '1_000' is not allowed"),
        ("0x10", "error: number '0x10' is not allowed"),
        ("1,000", "error: tuple is not allowed"),
        ("1 # comment", "error: comments are not allowed"),
        ("2**100000", "error: exponent too large"),
        ("9**9**9", "error: exponent too large"),
        ("2**-65", "error: exponent too large"),
        ("10**11*10**11", "error: number too large"),
        ("9" * 13, "error: number too large"),
        ("2.5**64", "error: number too large"),
        ("1/0", "error: division by zero"),
        ("1//0", "error: division by zero"),
        ("5%0", "error: division by zero"),
        ("0**-1", "error: division by zero"),
        ("(-8)**0.5", "error: result is not a real number"),
        ("2+", "error: syntax"),
        ("", "error: syntax"),
        ("   ", "error: syntax"),
        ("(1", "error: syntax"),
        ("1" + "+1" * 100, "error: too long"),
    ],
)
def test_refuses_with_the_right_kind_of_error(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


def test_bounds_are_configurable() -> None:
    assert calculate("10**11*10**11", max_abs=1e30) == str(10**22)
    assert calculate("2**65", max_exponent=100, max_abs=1e30) == str(2**65)
    assert calculate("1+1", max_length=2) == "error: too long"


def test_never_raises_on_non_string_input() -> None:
    assert calculate(None).startswith("error: ")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "expression",
    ["(" * 5000 + "1" + ")" * 5000, "-" * 50000 + "1", "+".join(["1"] * 20000), "1" * 5000],
)
def test_pathological_input_returns_an_error_instead_of_crashing(expression: str) -> None:
    assert calculate(expression).startswith("error: ")
    assert calculate(expression, max_length=10**6, max_abs=1e300, timeout_s=5.0).startswith("error: ")


def test_deadline_is_enforced() -> None:
    nested = "(" * 50 + "1+" * 40 + "1" + ")" * 50
    assert calculate(nested, max_length=1000) == "41"
    assert calculate(nested, max_length=1000, timeout_s=1e-9) == "error: timeout"


def test_normal_call_is_fast() -> None:
    start = time.perf_counter()
    assert calculate("(2+3)*4-7//2+2**10/3") == "358.333333"
    assert time.perf_counter() - start < 0.1


def test_registry_dispatch() -> None:
    registry = default_registry()
    assert "calculator" in registry
    assert registry.names() == ["calculator"]
    assert registry.run("calculator: 1+1") == "2"
    assert registry.run("calculator:2*3") == "6"
    assert registry.run("1+1") == "2"
    assert registry.run("nope: 1") == "error: unknown tool 'nope'"
    assert registry.run("calculator: x") == "error: name 'x' is not allowed"


def test_registry_catches_raising_tools_and_uses_first_tool_as_default() -> None:
    def boom(args: str) -> str:
        raise KeyError(args)

    registry = ToolRegistry()
    assert registry.run("1+1") == "error: no tools registered"
    registry.register("echo", lambda args: args)
    registry.register("boom", boom)
    assert registry.names() == ["echo", "boom"]
    assert "boom" in registry and "calc" not in registry
    assert registry.run("hello") == "hello"
    assert registry.run("boom: 1") == "error: KeyError"


def test_registry_explicit_default_and_name_validation() -> None:
    registry = ToolRegistry(default="calc")
    registry.register("echo", lambda args: args.upper())
    assert registry.run("1+1") == "error: unknown tool 'calc'"
    registry.register("calc", calculate)
    assert registry.run("1+1") == "2"
    assert registry.run("echo: hi") == "HI"
    with pytest.raises(ValueError):
        registry.register("not a name", calculate)
