"""Numbers as people write them in answers: a leaf module (no posttrain imports), shared by the GSM8K task and
the answer rewards."""

from __future__ import annotations

import math
import re
import sys
from decimal import Decimal

DIGITS = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"  # 1,234,567.89 | 1234567.89 | .89; no exponent
NUMBER_IN_TEXT = r"(?:(?<![\w)])-)?\$?" + DIGITS  # a number in text; "5-3" holds 5 and 3, not −3
_PLAIN_NUMBER = re.compile(DIGITS)  # what is left once sign, $, % and a final period are off


def normalize_number(s: str) -> str | None:
    """A number written the way people write it, as a canonical string; None if it is not one.

    Surrounding spaces, a trailing period, a leading ``$`` (after an optional sign), a trailing ``%``
    and thousands commas go; trailing fractional zeros go: "1,000.00" → "1000", "$5" → "5",
    "-3.50" → "-3.5", "7.0" → "7", "12%" → "12", ".50" → "0.5", "-0" → "0". Commas must group thousands ("12,34"
    is not a number); anything else around the number (units, words) makes it None, and so does an integer of
    more digits than Python converts to text (``sys.get_int_max_str_digits()``, 4,300).
    """
    text = s.strip().removesuffix(".").removesuffix("%").strip()
    sign = ""
    if text.startswith(("-", "+")):
        sign, text = text[0], text[1:].lstrip()
    text = text.removeprefix("$").lstrip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    plain = text.replace(",", "")
    limit = sys.get_int_max_str_digits()  # 4,300 by default; 0: no limit
    if limit and len(plain) > limit:  # first: int() of a huge Decimal takes quadratic time, and Decimal's context
        return None  # arithmetic (the sign, the rounding) overflows past a million digits
    value = Decimal(plain)
    try:
        value = -value if sign == "-" else value
        if value == value.to_integral_value():
            return str(int(value))
        return format(value.normalize(), "f")
    except ArithmeticError:  # decimal.Overflow and friends, with no limit set
        return None


def same_number(a: str | None, b: str | None) -> bool:
    """|a − b| ≤ 1e-6 · max(|a|, |b|) for two number strings; False if either is None or not a float."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except ValueError:
        return False
