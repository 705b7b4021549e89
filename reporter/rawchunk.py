"""Decode the collector's compacted raw rows (raw_chunk, schema 5).

The format is gua_collector.rawchunk's (SCHEMA.md, "raw_chunk"): the
reporter ships without the collector, so it carries its own decoder, and
tests/test_rawchunk.py holds the two to the same bytes. A damaged blob is a
ChunkError, never a wrong row.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from array import array
from itertools import accumulate

MAGIC = b"GUA\x01"
FLAG_NULLS = 1
FLAG_DELTA = 2
_LEN = struct.Struct("<I")


class ChunkError(ValueError):
    """A blob is not a chunk the collector wrote (damaged, or a newer format)."""


def decode(blob: bytes) -> list[tuple[str, tuple[str, ...], list[tuple[int | None, ...]]]]:
    """[(table name, columns, rows)] of a chunk; rows are tuples of int or None."""
    try:
        payload = zlib.decompress(blob)
    except (zlib.error, TypeError) as error:
        raise ChunkError(f"not a zlib stream ({error})") from None
    if payload[:4] != MAGIC or len(payload) < 8:
        raise ChunkError("unknown chunk format")
    (size,) = _LEN.unpack_from(payload, 4)
    pos = 8 + size
    try:
        header = json.loads(payload[8:pos])
        specs = [(str(t["name"]), tuple(str(c) for c in t["columns"]), int(t["rows"])) for t in header["tables"]]
    except (ValueError, TypeError, KeyError) as error:
        raise ChunkError(f"damaged header ({error})") from None
    tables: list[tuple[str, tuple[str, ...], list[tuple[int | None, ...]]]] = []
    for name, columns, n in specs:
        values: list[list[int | None]] = []
        for _ in columns:
            column, pos = _column(payload, pos, n)
            values.append(column)
        tables.append((name, columns, list(zip(*values)) if columns else []))
    if pos != len(payload):
        raise ChunkError("length does not match its header")
    return tables


def _column(payload: bytes, pos: int, n: int) -> tuple[list[int | None], int]:
    """One column's n values from payload[pos:], and where the next column starts."""
    if n < 0 or pos + 1 + 8 * n > len(payload):
        raise ChunkError("shorter than its header says")
    flags = payload[pos]
    pos += 1
    if flags & ~(FLAG_NULLS | FLAG_DELTA):
        raise ChunkError("unknown column flags")
    mask = b""
    if flags & FLAG_NULLS:
        mask = payload[pos:pos + n]
        pos += n
    planes = payload[pos:pos + 8 * n]
    if len(planes) != 8 * n:
        raise ChunkError("shorter than its header says")
    buf = bytearray(8 * n)
    for i in range(8):  # byte planes back to little-endian int64s
        buf[i::8] = planes[i * n:(i + 1) * n]
    raw = array("q")
    raw.frombytes(buf)
    if sys.byteorder == "big":
        raw.byteswap()
    values: list[int | None] = list(accumulate(raw)) if flags & FLAG_DELTA else list(raw)
    if mask:
        values = [None if m else v for v, m in zip(values, mask)]
    return values, pos + 8 * n
