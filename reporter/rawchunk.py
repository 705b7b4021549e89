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
# No hour of rows comes near this (1 s ticks, 64 GPUs, 10 processes each:
# ~200 MiB); a blob that unpacks to more is not the collector's.
MAX_PAYLOAD = 1 << 30
_LEN = struct.Struct("<I")


class ChunkError(ValueError):
    """A blob is not a chunk the collector wrote (damaged, or a newer format)."""


Rows = list[tuple[int | None, ...]]
Flat = tuple[str, tuple[str, ...], int, list[int | None]]


def decode(blob: bytes) -> list[tuple[str, tuple[str, ...], Rows]]:
    """[(table name, columns, rows)] of a chunk; rows are tuples of int or None."""
    out: list[tuple[str, tuple[str, ...], Rows]] = []
    for name, columns, n, flat in decode_flat(blob):
        k = len(columns)
        out.append((name, columns, [tuple(flat[i * k:(i + 1) * k]) for i in range(n)] if k else []))
    return out


def decode_flat(blob: bytes) -> list[Flat]:
    """[(table name, columns, rows, values)] of a chunk, the values row after row in one list.

    The form an INSERT of many rows at once binds (rawload), built by slice
    assignment rather than a tuple per row.
    """
    try:
        inflate = zlib.decompressobj()
        payload = inflate.decompress(blob, MAX_PAYLOAD)
        if inflate.unconsumed_tail:
            raise ChunkError(f"larger than {MAX_PAYLOAD >> 20} MiB unpacked")
        if not inflate.eof or inflate.unused_data:
            raise ChunkError("not a zlib stream (truncated, or bytes after its end)")
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
    tables: list[Flat] = []
    for name, columns, n in specs:
        k = len(columns)
        if n < 0 or pos + k * (1 + 8 * n) > len(payload):
            raise ChunkError("shorter than its header says")
        flat: list[int | None] = [None] * (n * k)
        for j in range(k):
            column, pos = _column(payload, pos, n)
            flat[j::k] = column
        tables.append((name, columns, n if k else 0, flat))
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
    nulls = mask.count(1)
    if mask and nulls + mask.count(0) != n:
        raise ChunkError("damaged NULL mask")
    if nulls == n:
        values = [None] * n
    elif nulls * 8 < n:  # a few: find them
        i = mask.find(1)
        while i >= 0:
            values[i] = None
            i = mask.find(1, i + 1)
    elif nulls:
        values = [None if m else v for v, m in zip(values, mask)]
    return values, pos + 8 * n
