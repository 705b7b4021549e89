"""The compacted raw-row format: the collector's encoder, both decoders, and damaged blobs.

The reporter ships without the collector and carries its own decoder
(gua_report.rawchunk); these tests hold the two to the same bytes: every
chunk the collector writes reads back, in both, exactly as the rows it was
made from, and a damaged one is an error in both, never a wrong row.
"""

from __future__ import annotations

import json
import random
import struct
import zlib

import pytest

from gua_collector import rawchunk as writer
from gua_report import rawchunk as reader

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
GPU_COLUMNS = ("tick_id", "gpu_id", "status", "util_permille", "coverage_permille", "mem_used_mib",
               "power_mw", "energy_mj", "sm_active_permille", "tensor_active_permille")
PROC_COLUMNS = ("tick_id", "gpu_id", "proc_id", "kind", "mem_mib", "sm_util", "cpu_permille", "rss_mib")


def random_tables(rng: random.Random, ticks: int, gpus: int) -> list[writer.Table]:
    """An hour-like chunk: slowly changing values, NULLs in runs and alone, and a few extremes."""
    gpu_rows, proc_rows = [], []
    for t in range(1000, 1000 + ticks):
        for g in range(gpus):
            util = rng.choice([None, 0, 1000, rng.randrange(1001)])
            gpu_rows.append((t, g, rng.choice([0, 0, 0, 1, 2]), util, None if util is None else rng.choice([None, 987]),
                             rng.randrange(81_559), rng.choice([None, 70_000 + rng.randrange(600_000)]),
                             rng.randrange(7_000_000), rng.choice([None, rng.randrange(1001)]), None))
            for p in range(rng.randrange(3)):
                proc_rows.append((t, g, 50 + g * 3 + p, rng.choice([1, 2, 3, 5]), rng.choice([None, 4096, 0]),
                                  rng.choice([None, rng.randrange(101)]), rng.choice([None, rng.randrange(64_000)]),
                                  rng.choice([None, 1 << 40, INT64_MAX, INT64_MIN, -1])))
    return [writer.Table("gpu_sample", GPU_COLUMNS, gpu_rows), writer.Table("proc_sample", PROC_COLUMNS, proc_rows)]


def as_reader(tables: list[writer.Table]) -> list[tuple]:
    return [(t.name, t.columns, t.rows) for t in tables]


@pytest.mark.parametrize("seed", range(12))
def test_both_decoders_give_back_the_rows(seed):
    rng = random.Random(seed)
    tables = random_tables(rng, rng.randrange(1, 400), rng.randrange(1, 9))
    blob = writer.encode(tables)
    assert writer.decode(blob) == tables
    assert reader.decode(blob) == as_reader(tables)


def test_extremes_empty_tables_and_all_null_columns():
    # Differences of int64 extremes overflow int64: such a column is stored as values, not differences.
    tables = [writer.Table("gpu_sample", ("a", "b", "c"),
                           [(INT64_MAX, None, 0), (INT64_MIN, None, -5), (0, None, INT64_MAX), (INT64_MAX, None, 1)]),
              writer.Table("proc_sample", PROC_COLUMNS, []),
              writer.Table("nothing", (), [])]
    blob = writer.encode(tables)
    assert writer.decode(blob) == tables
    assert reader.decode(blob) == as_reader(tables)


def test_an_hour_of_steady_rows_is_a_few_bytes_a_row():
    rows = [(t, g, 0, 1000, None, 40_000 + g, None, 5_600_000 + (t % 7) * 1000, None, None)
            for t in range(360) for g in range(8)]
    blob = writer.encode([writer.Table("gpu_sample", GPU_COLUMNS, rows)])
    assert len(blob) < len(rows)  # under a byte a row: SQLite rows of the same values take ~26


@pytest.mark.parametrize("value", [1.5, "7", b"\x00", True, 1 << 63, -(1 << 63) - 1])
def test_a_value_that_is_not_a_64_bit_integer_is_refused(value):
    with pytest.raises(writer.ChunkError, match="gpu_sample.power_mw"):
        writer.encode([writer.Table("gpu_sample", ("tick_id", "power_mw"), [(1, 2), (2, value)])])


def test_rows_of_the_wrong_width_are_refused():
    with pytest.raises(writer.ChunkError, match="2 values, not 3"):
        writer.encode([writer.Table("gpu_sample", ("a", "b", "c"), [(1, 2)])])


def _payload(header: object, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return zlib.compress(writer.MAGIC + struct.pack("<I", len(head)) + head + body)


def _good_blob() -> bytes:
    return writer.encode(random_tables(random.Random(99), 30, 2))


DAMAGED = {
    "empty": b"",
    "not zlib": b"SQLite format 3\x00" * 4,
    "no magic": zlib.compress(b"GUA\x02" + bytes(40)),
    "header shorter than it says": zlib.compress(writer.MAGIC + struct.pack("<I", 500) + b"{}"),
    "header not JSON": zlib.compress(writer.MAGIC + struct.pack("<I", 3) + b"{x}"),
    "header without tables": _payload({"rows": 3}),
    "tables not a list of objects": _payload({"tables": ["gpu_sample"]}),
    "negative row count": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": -1}]}),
    "huge row count": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": 1 << 40}]}, b"\x00" * 9),
    "column shorter than its rows": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": 2}]}, b"\x02" + bytes(9)),
    "unknown column flags": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": 1}]}, b"\x08" + bytes(8)),
    "bytes after the last column": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": 1}]}, b"\x02" + bytes(9)),
    "truncated": _good_blob()[:-7],
    "bytes after the stream": _good_blob() + b"\x00",
    "NULL mask not 0 or 1": _payload({"tables": [{"name": "t", "columns": ["a"], "rows": 2}]},
                                     b"\x03\x01\x02" + bytes(16)),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_blobs_are_errors_in_both_decoders(name):
    blob = DAMAGED[name]
    with pytest.raises(writer.ChunkError):
        writer.decode(blob)
    with pytest.raises(reader.ChunkError):
        reader.decode(blob)


def test_every_flipped_byte_is_caught():
    """zlib's own checks and its Adler-32 turn any one damaged byte into an error, never other rows."""
    blob = _good_blob()
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        with pytest.raises(reader.ChunkError):
            reader.decode(bytes(bad))


def test_a_blob_that_unpacks_too_large_is_refused_before_it_fills_memory(monkeypatch):
    blob = _good_blob()
    for module in (writer, reader):
        monkeypatch.setattr(module, "MAX_PAYLOAD", 1000)
    with pytest.raises(writer.ChunkError, match="larger than 0 MiB unpacked"):
        writer.decode(blob)
    with pytest.raises(reader.ChunkError, match="larger than 0 MiB unpacked"):
        reader.decode(blob)
    with pytest.raises(writer.ChunkError, match="larger than a chunk may be"):
        writer.encode(random_tables(random.Random(99), 30, 2))
