"""The library's size and budget syntax (src/base/config/values.rs, docs/CONFIGURATION.md#sizes),
so that a bad `--budget` is refused by the command before any program starts, instead of being
replaced by the default with one ERROR line inside the program."""

import re

MIN_BUDGET_BYTES = 16 << 20  # the library's MIN_BUDGET_BYTES
MAX_SIZE_BYTES = 1 << 63
SIZE_EXAMPLES = "not a size (e.g. 6G, 512MiB, 1.5G, 50%, off)"
_UNIT_SHIFTS = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_SIZE = re.compile(r"([0-9]*\.?[0-9]*)\s*([a-z]?)(i?b?)", re.I)
_WHITESPACE = " \t\n\r\x0b\x0c"  # what the library's trim() strips (ASCII whitespace)


class BadSize(ValueError):
    """The reason a value is refused, in the library's words."""


def parse_size(text):
    """Bytes of a size like 6G, 512MiB, 1.5g, 64 M, 1073741824."""
    text = text.strip(_WHITESPACE)
    if not text:
        raise BadSize("empty")
    if text.startswith("-"):
        raise BadSize("negative")
    match = _SIZE.fullmatch(text)
    if not match or not any(c.isdigit() for c in match.group(1)):
        raise BadSize(SIZE_EXAMPLES)
    number, letter, suffix = match.groups()
    letter = letter.lower()
    if letter not in _UNIT_SHIFTS or (suffix and (letter in ("", "b") or suffix.lower() not in ("ib", "b"))):
        raise BadSize("unknown unit (use K, M, G or T, optionally with iB)")
    value = float(number) * (1 << _UNIT_SHIFTS[letter])
    if value >= MAX_SIZE_BYTES:
        raise BadSize("too large (at most 2^63 bytes)")
    return int(value)


def check_budget(text):
    """Raises BadSize unless text is a budget the library takes: a size of at least 16 MiB,
    a percentage over 0 and at most 100, or off."""
    trimmed = text.strip(_WHITESPACE)
    if trimmed.lower() == "off":
        return
    if trimmed.endswith("%"):
        number = trimmed[:-1].strip(_WHITESPACE)
        if not number:
            raise BadSize("empty percentage")
        if number.startswith("-"):
            raise BadSize("negative")
        if not re.fullmatch(r"[0-9]*\.?[0-9]*", number) or not any(c.isdigit() for c in number):
            raise BadSize("not a percentage")
        percent = float(number)
        if percent > 100:
            raise BadSize("a percentage over 100")
        if percent <= 0:
            raise BadSize("a percentage of zero")
        return
    if parse_size(text) < MIN_BUDGET_BYTES:
        raise BadSize("below the 16 MiB minimum")
