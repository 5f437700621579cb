"""Numbers as people write them in answers: a leaf module (no posttrain imports), shared by the GSM8K task and
the answer rewards."""

from __future__ import annotations

import math
import re
import sys
from decimal import Decimal
from fractions import Fraction

DIGITS = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"  # 1,234,567.89 | 1234567.89 | .89; no exponent
NUMBER_IN_TEXT = r"(?:(?<![\w)])-)?\$?" + DIGITS  # a number in text; "5-3" holds 5 and 3, not −3
# A final answer may also be a fraction or in scientific notation: "3/4", "1e3", "2.5E-2".
ANSWER_NUMBER = NUMBER_IN_TEXT + r"(?:\s*/\s*" + DIGITS + r"|[eE][-+]?\d+)?"
_PLAIN_NUMBER = re.compile(DIGITS)  # what is left once sign, $, % and a final period are off
_FRACTION = re.compile(r"(" + DIGITS + r")\s*/\s*(" + DIGITS + r")")
_SCIENTIFIC = re.compile(DIGITS + r"[eE][-+]?\d+")


def normalize_number(s: str, extended: bool = True) -> str | None:
    """A number written the way people write it, as a canonical string; None if it is not one.

    Surrounding spaces, a trailing period, a leading ``$`` (after an optional sign), a trailing ``%``
    and thousands commas go; trailing fractional zeros go: "1,000.00" → "1000", "$5" → "5",
    "-3.50" → "-3.5", "7.0" → "7", "12%" → "12", ".50" → "0.5", "-0" → "0". Scientific notation is its value
    ("1e3" → "1000", "2.5E-2" → "0.025"); a fraction is its decimal when it has a finite one ("3/4" → "0.75"),
    else in lowest terms ("2/6" → "1/3"); "x/0" is None. Commas must group thousands ("12,34" is not a number);
    anything else around the number (units, words) makes it None, and so does a number of more digits than
    Python converts to text (``sys.get_int_max_str_digits()``, 4,300). ``extended=False``: plain decimals only
    (no fraction, no exponent).
    """
    text = s.strip().removesuffix(".").removesuffix("%").strip()
    sign = ""
    if text.startswith(("-", "+")):
        sign, text = text[0], text[1:].lstrip()
    text = text.removeprefix("$").lstrip()
    fraction = _FRACTION.fullmatch(text) if extended else None
    if fraction:
        num, den = (_decimal(part) for part in fraction.groups())
        if num is None or den is None or den == 0:
            return None
        value = Fraction(num) / Fraction(den)
        return _canonical(-value if sign == "-" else value)
    if not (_PLAIN_NUMBER.fullmatch(text) or (extended and _SCIENTIFIC.fullmatch(text))):
        return None
    value = _decimal(text)
    if value is None:
        return None
    return _canonical(Fraction(-value if sign == "-" else value))


def _decimal(text: str) -> Decimal | None:
    """``text`` (digits with thousands commas, maybe an exponent) as a Decimal; None past the digit limit."""
    plain = text.replace(",", "")
    limit = sys.get_int_max_str_digits() or 10**6  # 4,300 by default; 0: no limit (then a million)
    mantissa, _, exponent = plain.lower().partition("e")
    shift = int(exponent) if exponent else 0
    if len(mantissa) + abs(shift) > limit:  # first: int() of a huge Decimal takes quadratic time, Python refuses
        return None  # to write such an int, and Decimal's context arithmetic (the sign, the rounding) overflows
    return Decimal(plain)


def _canonical(value: Fraction) -> str:
    """An exact number as text: an integer, a finite decimal without trailing zeros, else "p/q" in lowest terms."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)  # value · 10^places is an integer
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}".rstrip("0")


def same_number(a: str | None, b: str | None) -> bool:
    """Whether two number strings are exactly the same number (each read by :func:`normalize_number`: "0.75" and
    "3/4" are, "1000001" and "1000000" are not); False if either is None or not a number."""
    if a is None or b is None:
        return False
    left, right = normalize_number(a), normalize_number(b)
    return left is not None and left == right


def close_number(a: str | None, b: str | None) -> bool:
    """|a − b| ≤ 1e-6 · max(|a|, |b|) for two number strings (a calculator's float against the number a text
    claims for it); False if either is None or not a float."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except ValueError:
        return False
