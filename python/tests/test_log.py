"""size_text, the byte counts in the companion's log lines and errors: one row per boundary."""

import pytest

from qvshim._log import GIB, KIB, MIB, size_text

SIZE_ROWS = [
    # (bytes, the text people read)
    (0, "0 B"),
    (900, "900 B"),
    (KIB - 1, "1023 B"),
    (KIB, "1.0 KiB"),
    (12 * KIB + KIB // 2, "12.5 KiB"),
    (MIB - 1, "1024.0 KiB"),
    (MIB, "1.0 MiB"),
    (312 * MIB, "312.0 MiB"),
    (GIB - 1, "1024.0 MiB"),
    (GIB, "1.00 GiB"),
    (GIB + GIB // 2, "1.50 GiB"),
    (40 * GIB + GIB // 4, "40.25 GiB"),
    (-900, "-900 B"),
    (-(MIB + MIB // 2), "-1.5 MiB"),
    (-(GIB + GIB // 2), "-1.50 GiB"),
]


@pytest.mark.parametrize("n_bytes,text", SIZE_ROWS, ids=[r[1] for r in SIZE_ROWS])
def test_size_text_names_the_largest_unit_that_fits_and_keeps_the_sign(n_bytes, text):
    assert size_text(n_bytes) == text, f"expected size_text({n_bytes}) == {text!r}, got {size_text(n_bytes)!r}"
