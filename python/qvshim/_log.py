"""The package's logger: lines prefixed like the library's, at the level QVSHIM_LOG names."""

import logging
import os
import sys

_LEVELS = {
    "off": logging.CRITICAL + 1,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

logger = logging.getLogger("qvshim")

# An app that configured logging itself keeps control; otherwise the lines reach stderr, as the
# library's own do, since a load or unload nobody sees explains nothing.
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[qvshim] %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
    logger.setLevel(_LEVELS.get(os.environ.get("QVSHIM_LOG", "info").strip().lower(), logging.INFO))

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10


def size_text(n_bytes):
    """A byte count for people: 1.50 GiB, 312.0 MiB, 12.0 KiB, 900 B (sign kept)."""
    sign = "-" if n_bytes < 0 else ""
    n = abs(n_bytes)
    for unit, name, digits in ((GIB, "GiB", 2), (MIB, "MiB", 1), (KIB, "KiB", 1)):
        if n >= unit:
            return f"{sign}{n / unit:.{digits}f} {name}"
    return f"{sign}{n} B"
