"""Parse human durations such as 10s, 1m, 90d."""

from __future__ import annotations

import re

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# Nothing gua keeps or waits for is longer than a century; beyond it SQLite's
# 64-bit integers and the clock arithmetic overflow.
MAX_MS = 100 * 366 * 86_400_000
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration_ms(text: str) -> int:
    """Return milliseconds for '10s', '1m', '1.5h', '90d'; a bare number means seconds."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10s, 1m, 12h, 90d)")
    number, unit = match.groups()
    value = float(number) * _UNITS_MS[unit or "s"]
    if not value <= MAX_MS:  # also catches inf from a few hundred digits
        raise ValueError(f"duration too long: {text.strip()!r} (at most 100 years)")
    ms = round(value)
    if ms <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return ms
