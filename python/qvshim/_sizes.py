"""The library's size and budget syntax (src/base/config/values.rs, docs/CONFIGURATION.md#sizes),
so that a bad `--budget` is refused by the command before any program starts, instead of being
replaced by the default with one ERROR line inside the program."""

import re

MIN_BUDGET_BYTES = 16 << 20  # the library's MIN_BUDGET_BYTES
MAX_SIZE_BYTES = 1 << 63
SIZE_EXAMPLES = "not a size (e.g. 6G, 512MiB, 1.5G, 50%, off)"
_UNIT_SHIFTS = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40}
UNKNOWN_UNIT = "unknown unit (use K, M, G or T, optionally with iB)"
_WHITESPACE = " \t\n\r\x0b\x0c"  # what the library's trim() strips (ASCII whitespace)


class BadSize(ValueError):
    """The reason a value is refused, in the library's words."""


def _ascii_lower(text):
    """Lower case for ASCII letters only, as the library compares units (eq_ignore_ascii_case)."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def _unit_multiplier(unit):
    if not unit:
        return 1
    letter, suffix = _ascii_lower(unit[0]), _ascii_lower(unit[1:])
    if letter not in _UNIT_SHIFTS or (letter == "b" and suffix):
        raise BadSize(UNKNOWN_UNIT)
    shift = _UNIT_SHIFTS[letter]
    if suffix and suffix != "ib" and not (shift > 0 and suffix == "b"):
        raise BadSize(UNKNOWN_UNIT)
    return 1 << shift


def _decimal(number):
    """Digits with at most one '.', at least one digit; else None."""
    if re.fullmatch(r"[0-9]*\.?[0-9]*", number) and any("0" <= c <= "9" for c in number):
        return float(number)
    return None


def parse_size(text):
    """Bytes of a size like 6G, 512MiB, 1.5g, 64 M, 1073741824: a number (its digits and dots),
    then a unit after optional whitespace, judged in that order, as the library does."""
    text = text.strip(_WHITESPACE)
    if not text:
        raise BadSize("empty")
    if text.startswith("-"):
        raise BadSize("negative")
    end = re.match(r"[0-9.]*", text).end()
    value = _decimal(text[:end])
    if value is None:
        raise BadSize(SIZE_EXAMPLES)
    value *= _unit_multiplier(text[end:].strip(_WHITESPACE))
    if value >= MAX_SIZE_BYTES:
        raise BadSize("too large (at most 2^63 bytes)")
    return int(value)


def check_budget(text):
    """Raises BadSize unless text is a budget the library takes: a size of at least 16 MiB,
    a percentage over 0 and at most 100, or off."""
    trimmed = text.strip(_WHITESPACE)
    if _ascii_lower(trimmed) == "off":
        return
    if trimmed.endswith("%"):
        number = trimmed[:-1].strip(_WHITESPACE)
        if not number:
            raise BadSize("empty percentage")
        if number.startswith("-"):
            raise BadSize("negative")
        percent = _decimal(number)
        if percent is None:
            raise BadSize("not a percentage")
        if percent > 100:
            raise BadSize("a percentage over 100")
        if percent <= 0:
            raise BadSize("a percentage of zero")
        return
    if parse_size(text) < MIN_BUDGET_BYTES:
        raise BadSize("below the 16 MiB minimum")
