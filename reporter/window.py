"""Parsing of times, durations, thresholds and time zones; no database here.

All instants are UTC epoch milliseconds, as in the database. A report window
is half-open, [since_ms, until_ms), over each tick's `ts_ms`: that makes a
whole UTC hour h exactly the ticks of the rollup row `hour = h`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}


class WindowError(ValueError):
    """A value the user typed cannot be understood (exit code 2)."""


def parse_duration_ms(text: str) -> int | None:
    """'90m', '12h', '7d', '2w' -> milliseconds; None when it is not a duration."""
    m = _DURATION.match(text)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT_MS[m.group(2).lower()])


def parse_instant(text: str, now_ms: int, tz: tzinfo) -> int:
    """A --since/--until value: a duration before now, 'now', or an ISO date/datetime.

    A date or a datetime without an offset is read in the report's time zone,
    so `--since 2024-05-01` means local midnight, as a person would expect.
    """
    text = text.strip()
    if text.lower() == "now":
        return now_ms
    dur = parse_duration_ms(text)
    if dur is not None:
        return now_ms - dur
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text)
            dt = datetime(d.year, d.month, d.day)
        else:
            dt = datetime.fromisoformat(text)
    except ValueError:
        raise WindowError(
            f"cannot read time {text!r}: use a duration (90m, 12h, 7d, 2w) "
            "or an ISO date/datetime (2024-05-01, 2024-05-01T09:30)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1000)


def parse_percent_permille(text: str) -> int:
    """'10', '10%', '7.5' -> permille (100, 100, 75)."""
    t = text.strip().rstrip("%").strip()
    try:
        value = float(t)
    except ValueError:
        raise WindowError(f"cannot read percentage {text!r}") from None
    if not 0 <= value <= 100:
        raise WindowError(f"percentage {text!r} is not between 0 and 100")
    return round(value * 10)


def parse_bytes(text: str) -> int:
    """'100MB', '100 MiB', '1GB', '100' (MB) -> bytes. MB = 10^6, MiB = 2^20."""
    m = _SIZE.match(text)
    if not m:
        raise WindowError(f"cannot read size {text!r}: use e.g. 100MB, 512MiB, 1GB")
    unit = (m.group(2) or "mb").lower()
    return int(float(m.group(1)) * _SIZE_FACTOR[unit])


def local_zone() -> tuple[tzinfo, str]:
    """The host's zone as a ZoneInfo (with DST rules), and a name to print."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            key = target.split("zoneinfo/", 1)[1]
            return ZoneInfo(key), key
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime"), "localtime"
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return UTC, "UTC"


def zone(name: str | None) -> tuple[tzinfo, str]:
    """--tz NAME -> zone; None -> the host's local zone."""
    if name is None:
        return local_zone()
    if name.upper() in ("UTC", "Z"):
        return UTC, "UTC"
    try:
        return ZoneInfo(name), name
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)") from None


def offset_ms(tz: tzinfo, ts_ms: int) -> int:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz)
    off = dt.utcoffset() or timedelta(0)
    return int(off.total_seconds() * 1000)


@dataclass(frozen=True)
class Segment:
    """From `start_ms` (inclusive) the zone is `offset_ms` ahead of UTC."""

    start_ms: int
    offset_ms: int


def offset_segments(tz: tzinfo, since_ms: int, until_ms: int) -> list[Segment]:
    """The zone's UTC offsets over the window, as few segments as there are changes.

    Probing once a day and bisecting on a change costs ~365 calls per year of
    window, which lets the SQL turn ts_ms into a local hour with a short CASE.
    """
    segments = [Segment(since_ms, offset_ms(tz, since_ms))]
    t = since_ms
    while t < until_ms:
        nxt = min(t + DAY_MS, until_ms)
        off = offset_ms(tz, nxt)
        if off != segments[-1].offset_ms:
            lo, hi = t, nxt  # offset(lo) == previous, offset(hi) == new
            while hi - lo > 1000:
                mid = (lo + hi) // 2
                if offset_ms(tz, mid) == segments[-1].offset_ms:
                    lo = mid
                else:
                    hi = mid
            segments.append(Segment(hi // 1000 * 1000, off))
        t = nxt
    return segments


def fmt_local(ts_ms: int, tz: tzinfo, seconds: bool = False) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def iso_utc(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
    ms = ts_ms % 1000
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


def fmt_duration(ms: int) -> str:
    """Compact human duration: 45s, 12m, 3h05m, 2d04h."""
    s = ms // 1000
    if s < 60:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
