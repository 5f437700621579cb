"""The config errors and the checks every config section uses: a leaf module (no posttrain imports), so the
modules that define sections (sampling, monitor, prompt sampling, the model engine) can use them too."""

from __future__ import annotations

import difflib
import math


class ConfigError(ValueError):
    """A config that cannot be used, with a message that says what to change."""


def check_choice(key: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"config key '{key}' has unknown value '{value}'{suggest(value, valid)}")


def check_range(key: str, value: float, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, infinite: bool = False, note: str = "") -> None:
    """ConfigError unless low ≤ value ≤ high (< at an open end), e.g. "config key 'optim.lr' must be > 0,
    got -0.1". NaN never passes, ±inf only with ``infinite``; ``note`` follows the rule in the message."""
    if not infinite and math.isinf(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return
    if low == -math.inf and high == math.inf:
        rule = "a number"  # only NaN gets here
    elif high == math.inf:
        rule = f"{'>' if low_open else '>='} {low:g}"
    elif low == -math.inf:
        rule = f"{'<' if high_open else '<='} {high:g}"
    else:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"config key '{key}' must be {rule}{note}, got {value!r}")


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or the list of valid names."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"
