"""The compacted form of an hour's raw rows (schema 5): encode, and decode to check.

An hour that is rolled up and more than a day old is read again only by
a report that needs raw rows (a window's partial edge hours, a threshold the
histograms cannot answer). Its gpu_sample and proc_sample rows then move
into one raw_chunk blob (compact.py): as rows, a GPU-tick costs ~55 B; as a
chunk, a few. The reporter decodes chunks back into rows equal to the ones
stored (gua_report.rawchunk) and runs its usual SQL over them.

Format 1 (SCHEMA.md, "raw_chunk"), a zlib stream (its Adler-32 catches a
damaged blob) of:
    MAGIC | u32 LE header length | header: UTF-8 JSON
          {"tables": [{"name": str, "columns": [str, ...], "rows": n}, ...]}
    then per table, per column, n values:
          flags: u8 (FLAG_NULLS, FLAG_DELTA)
          [FLAG_NULLS: n bytes, 1 where the value is NULL]
          n int64 little-endian values as 8 byte planes (every value's
          byte 0, then every byte 1, ...); with FLAG_DELTA each is the
          difference from the previous one (the first from 0). A NULL
          repeats the previous value, so its difference is 0.
Columns of small, slowly changing integers become runs of zero bytes that
zlib squeezes away, and decoding is C-speed (zlib, slice assignment,
array, itertools.accumulate).
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from itertools import accumulate

MAGIC = b"GUA\x01"
FLAG_NULLS = 1
FLAG_DELTA = 2
# No hour of rows comes near this (1 s ticks, 64 GPUs, 10 processes each:
# ~200 MiB); a blob that unpacks to more is not the collector's.
MAX_PAYLOAD = 1 << 30
ZLIB_LEVEL = 6
_INT64 = (-(1 << 63), (1 << 63) - 1)
_LEN = struct.Struct("<I")

Value = int | None


class ChunkError(ValueError):
    """A blob is not a chunk this code wrote, or its rows cannot be encoded (not all integers)."""


@dataclass(frozen=True)
class Table:
    """Rows of one table, every value an int or None, in `columns` order."""

    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Value, ...]]


def encode(tables: list[Table]) -> bytes:
    """One chunk holding every table's rows."""
    header = {"tables": [{"name": t.name, "columns": list(t.columns), "rows": len(t.rows)} for t in tables]}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, _LEN.pack(len(head)), head]
    for t in tables:
        columns = list(zip(*t.rows)) if t.rows else [() for _ in t.columns]
        if len(columns) != len(t.columns):
            raise ChunkError(f"{t.name}: rows have {len(columns)} values, not {len(t.columns)}")
        for name, values in zip(t.columns, columns):
            parts.append(_encode_column(f"{t.name}.{name}", values))
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD:
        raise ChunkError(f"{len(payload) >> 20} MiB: larger than a chunk may be")
    return zlib.compress(payload, ZLIB_LEVEL)


def _encode_column(name: str, values: tuple[Value, ...]) -> bytes:
    filled: list[int] = []
    previous = 0
    nulls = False
    for v in values:
        if v is None:
            nulls = True
        elif type(v) is int and _INT64[0] <= v <= _INT64[1]:
            previous = v
        else:
            raise ChunkError(f"{name}: {type(v).__name__} value, not a 64-bit integer")
        filled.append(previous)
    deltas = [b - a for a, b in zip([0, *filled], filled)]
    delta = all(_INT64[0] <= d <= _INT64[1] for d in deltas)
    flags = (FLAG_NULLS if nulls else 0) | (FLAG_DELTA if delta else 0)
    raw = array("q", deltas if delta else filled)
    if sys.byteorder == "big":
        raw.byteswap()
    data = raw.tobytes()
    mask = bytes(v is None for v in values) if nulls else b""
    return bytes((flags,)) + mask + b"".join(data[i::8] for i in range(8))


def decode(blob: bytes) -> list[Table]:
    """The tables of a chunk; ChunkError when it is damaged or not one."""
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
    tables = []
    for name, columns, n in specs:
        values = []
        for _ in columns:
            column, pos = _decode_column(payload, pos, n)
            values.append(column)
        tables.append(Table(name, columns, list(zip(*values)) if columns else []))
    if pos != len(payload):
        raise ChunkError("length does not match its header")
    return tables


def _decode_column(payload: bytes, pos: int, n: int) -> tuple[list[Value], int]:
    if n < 0 or pos + 1 + 8 * n > len(payload):
        raise ChunkError("shorter than its header says")
    flags = payload[pos]
    pos += 1
    mask = b""
    if flags & FLAG_NULLS:
        mask = payload[pos:pos + n]
        pos += n
    planes = payload[pos:pos + 8 * n]
    if len(planes) != 8 * n or flags & ~(FLAG_NULLS | FLAG_DELTA):
        raise ChunkError("shorter than its header says" if len(planes) != 8 * n else "unknown column flags")
    buf = bytearray(8 * n)
    for i in range(8):
        buf[i::8] = planes[i * n:(i + 1) * n]
    raw = array("q")
    raw.frombytes(buf)
    if sys.byteorder == "big":
        raw.byteswap()
    values: list[Value] = list(accumulate(raw)) if flags & FLAG_DELTA else list(raw)
    if mask:
        if mask.count(0) + mask.count(1) != n:
            raise ChunkError("damaged NULL mask")
        values = [None if m else v for v, m in zip(values, mask)]
    return values, pos + 8 * n
