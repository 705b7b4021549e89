"""`gua-report --format csv --table NAME`: one rectangular table per call, for spreadsheets.

Every table is checked against the JSON output of the same report (the
values must be the JSON's, only laid out flat), for its shape (a header,
every row as wide), for its times (ISO 8601 with the --tz offset) and for
the formula neutralisation of names other users chose.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gua_report import render_table
from report_helpers import HOUR, T0, Hostile, build_store_db, hostile_db, run_report
from test_report_startup import COSTLY, modules_after

pytestmark = pytest.mark.timeout(120)

JSON_MD = Path(__file__).resolve().parent.parent / "reporter" / "JSON.md"
TABLES = ("gpu", "identity", "unit", "hour", "heatmap", "event")
INTERVAL = 60_000
# 30 hours of the lab scenario from Monday 2024-01-01 00:00 UTC, the collector
# crashing after 10 h 20 min and starting again 40 minutes later.
LAB_WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-02T06:00Z")
LAB_SINCE, LAB_UNTIL = T0, T0 + 30 * HOUR
KOLKATA = ("--tz", "Asia/Kolkata")
HAND_WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z", "--tz", "UTC")

EVIL_USER = "=HYPERLINK(\"http://x\")"
EVIL_UNIT = "+cmd|' /C calc'!A0"
EVIL_GPU = "=H100"
EVIL_HOST = "@gpu\r01"
EVIL_GAP = "-gap hidden"
EVIL_NVML = "@err"
EVIL_INIT = "\tinit"
EVIL_UUID = "=GPU-evil\r1"  # from the driver: every table that names a GPU by UUID must neutralise it
_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


@pytest.fixture(scope="module")
def lab_db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tables") / "gua.db")
    return build_store_db(path, "lab", T0, T0 + 30 * HOUR, INTERVAL, hole_at_ms=T0 + 10 * HOUR + 1_234_567)


@pytest.fixture(scope="module")
def hand_db(tmp_path_factory) -> str:
    """Names that other users and the host chose, made to look like formulas; a gap and errors."""
    strings = Hostile(EVIL_USER, EVIL_UNIT, EVIL_HOST, EVIL_GAP, EVIL_NVML, EVIL_INIT)
    return hostile_db(str(tmp_path_factory.mktemp("hand") / "gua.db"), strings, {"name": EVIL_GPU},
                      {"uuid": EVIL_UUID}, evil_on=0, nvml_at_ms=T0 + 1_500)


def table(db: str, name: str, *args: str) -> list[list[str]]:
    """The rows of `--table name`, header first, read as a spreadsheet reads them (CR too)."""
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", db, "--format", "csv", "--table", name, *args],
                       capture_output=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    return list(csv.reader(io.StringIO(r.stdout.decode(), newline="")))


def report(db: str, *args: str) -> dict:
    r = run_report("--db", db, "--format", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def value(cell: str) -> object:
    """A cell back as the JSON value it stands for (numbers, booleans, null, text)."""
    if cell == "":
        return None
    if cell in ("true", "false"):
        return cell == "true"
    if re.fullmatch(r"-?[0-9]+", cell):
        return int(cell)
    if _NUMBER.fullmatch(cell):
        return float(cell)
    return cell


def by_name(rows: list[list[str]]) -> list[dict[str, Any]]:
    header, *body = rows
    return [{c: value(x) for c, x in zip(header, row)} for row in body]


def as_sheet_text(text: str) -> str:
    """`text` as a CSV cell holds it: with the leading "'" that keeps a formula from running."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def get(obj: dict, dotted: str) -> object:
    for key in dotted.split("."):
        if obj is None:
            return None
        obj = obj[key]
    return obj


def epoch_ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


# ---------------------------------------------------------------- shape

@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_rectangular_with_its_documented_header(lab_db, name):
    rows = table(lab_db, name, *LAB_WINDOW, *KOLKATA)
    header = rows[0]
    columns, _ = render_table.TABLES[name]
    assert tuple(header) == columns
    assert len(set(header)) == len(header)
    assert len(rows) > 1, "the lab database has rows for every table"
    assert {len(r) for r in rows} == {len(header)}, [r for r in rows if len(r) != len(header)]
    # JSON.md lists the columns, in order (identity and unit: the common tail).
    doc = " ".join(JSON_MD.read_text().split())
    documented = ",".join(header[header.index("held_ms"):] if "held_ms" in header else header)
    assert f"`{documented}`" in doc, name


def test_an_empty_table_is_its_header(hand_db):
    """A known user without samples: the identity table has no row, but still its header."""
    rows = table(hand_db, "identity", *HAND_WINDOW, "--user", "carol")
    assert rows == [list(render_table.IDENTITY_COLUMNS)]


# ---------------------------------------------------------------- values: those of the JSON

def test_gpu_table_agrees_with_the_json(lab_db):
    d = report(lab_db, *LAB_WINDOW, *KOLKATA)
    rows = by_name(table(lab_db, "gpu", *LAB_WINDOW, *KOLKATA))
    assert [r["uuid"] for r in rows] == [g["uuid"] for g in d["gpus"]] and len(rows) == 4
    for row, g in zip(rows, d["gpus"]):
        for column, cell in row.items():
            if column in g or column.split(".")[0] in ("mig", "energy"):
                assert cell == get(g, column), (g["index"], column)
        for state in ("active", "idle_held", "idle", "unknown"):
            assert row[f"{state}_gpu_hours"] == round(g[f"{state}_ms"] / HOUR, 4)
        parts = sum(row[f"{s}_gpu_hours"] for s in ("active", "idle_held", "idle", "unknown"))
        assert abs(parts - g["gpu_hours"]) < 0.0005
        assert row["error_count"] == sum(e["count"] for e in g["errors"])
        assert (row["since"], row["until"]) == ("2024-01-01T05:30:00+05:30", "2024-01-02T11:30:00+05:30")
    # The GPU table of the lab: bob's notebook keeps GPU 1 held, GPU 3 runs only Xorg.
    assert rows[1]["idle_held_gpu_hours"] > rows[1]["active_gpu_hours"]
    assert rows[3]["idle_share"] == 1.0
    only = by_name(table(lab_db, "gpu", *LAB_WINDOW, "--gpu", "2"))
    assert [r["index"] for r in only] == [2] and only[0]["total_ms"] == d["gpus"][2]["total_ms"]


@pytest.mark.parametrize("name, kind", [("identity", "users"), ("unit", "units")])
def test_identity_and_unit_tables_agree_with_the_json(lab_db, name, kind):
    d = report(lab_db, *LAB_WINDOW, *KOLKATA)
    rows = by_name(table(lab_db, name, *LAB_WINDOW, *KOLKATA))
    expected = d["identities"][kind]
    assert len(rows) == len(expected) > 0
    for row, i in zip(rows, expected):
        assert set(row) - {"since", "until"} == set(i), "every identity field of the JSON, nothing else"
        for column, cell in row.items():
            if column == "gpus":
                assert cell == ";".join(i["gpus"])
            elif column not in ("since", "until"):
                assert cell == i[column], (i["user"], column)
    if name == "unit":
        assert [(r["user"], r["unit"]) for r in rows] == [("carol", "slurm:job_4242")]
    else:
        bob = next(r for r in rows if r["user"] == "bob")
        assert bob["idle_held_waiting_on_cpu_ms"] and bob["idle_held_abandoned_ms"]  # split by CPU


def test_heatmap_table_is_the_heatmap_and_covers_the_window(lab_db):
    """168 cells, Monday 00 to Sunday 23 in --tz; known time exactly in the local hours the window touches."""
    d = report(lab_db, *LAB_WINDOW, *KOLKATA)
    rows = by_name(table(lab_db, "heatmap", *LAB_WINDOW, *KOLKATA))
    assert [(r["weekday_index"], r["hour"]) for r in rows] == [(wd, h) for wd in range(7) for h in range(24)]
    hm = d["heatmap"]
    for r in rows:
        wd, h = r["weekday_index"], r["hour"]
        assert r["weekday"] == hm["weekdays"][wd] and r["tz"] == "Asia/Kolkata"
        assert (r["active_ms"], r["known_ms"], r["active_share"]) == (
            hm["active_ms"][wd][h], hm["known_ms"][wd][h], hm["active_share"][wd][h])
        assert (r["since"], r["until"]) == ("2024-01-01T05:30:00+05:30", "2024-01-02T11:30:00+05:30")
    zone = ZoneInfo("Asia/Kolkata")
    local = {datetime.fromtimestamp(ms / 1000, zone) for ms in range(LAB_SINCE, LAB_UNTIL, INTERVAL)}
    touched = {(t.weekday(), t.hour) for t in local}
    assert len(touched) == 31  # Mon 05:30 .. Tue 11:30 local: 31 local hours, none twice
    assert {(r["weekday_index"], r["hour"]) for r in rows if r["known_ms"]} == touched
    assert sum(r["known_ms"] for r in rows) == d["headline"]["known_ms"]
    # The local hours are Kolkata's: Monday 05 holds only 05:30-06:00, 30 minutes of 4 GPUs.
    mon5 = next(r for r in rows if (r["weekday_index"], r["hour"]) == (0, 5))
    # 29 ticks of a minute each (plus a few ms of jitter): the run's first tick covers no time.
    assert abs(mon5["known_ms"] - 4 * 29 * INTERVAL) < 100, mon5


def test_hour_table_is_a_time_series_adding_up_to_the_gpu_table(lab_db):
    """A row per local hour and GPU (tests/test_report_hourly.py holds it to the JSON in every case)."""
    d = report(lab_db, *LAB_WINDOW, *KOLKATA)
    rows = by_name(table(lab_db, "hour", *LAB_WINDOW, *KOLKATA))
    hours = list(dict.fromkeys(r["hour"] for r in rows))
    assert len(hours) == 31 and len(rows) == 31 * len(d["gpus"])  # Mon 05:30 .. Tue 11:30 local, 4 GPUs
    assert hours[0] == "2024-01-01T05:00:00+05:30" and hours[-1] == "2024-01-02T11:00:00+05:30"
    assert (rows[0]["start"], rows[-1]["end"]) == ("2024-01-01T05:30:00+05:30", "2024-01-02T11:30:00+05:30")
    for g in d["gpus"]:
        mine = [r for r in rows if r["uuid"] == g["uuid"]]
        for column in ("ticks", "total_ms", "active_ms", "idle_held_ms", "idle_ms", "unknown_ms", "known_ms"):
            assert sum(r[column] for r in mine) == g[column], (g["index"], column)
    # The crash: 40 minutes from 15:50:34 local without ticks: the hours 15:00 and 16:00 are short
    # (as are the window's half hours at either end).
    short = {r["hour"] for r in rows if r["total_ms"] < HOUR - 2 * INTERVAL and r["hour"] not in (hours[0], hours[-1])}
    assert short == {"2024-01-01T15:00:00+05:30", "2024-01-01T16:00:00+05:30"}


def test_event_table_agrees_with_the_json_and_carries_the_zone_offset(lab_db, hand_db):
    for db, window in ((lab_db, LAB_WINDOW), (hand_db, HAND_WINDOW[:4])):
        d = report(db, *window, *KOLKATA)
        rows = by_name(table(db, "event", *window, *KOLKATA))
        dq = d["data_quality"]
        assert [r["start_ms"] for r in rows] == sorted(r["start_ms"] for r in rows)
        for r in rows:
            for col in ("start", "end"):
                if r[f"{col}_ms"] is None:
                    assert r[col] is None
                    continue
                assert str(r[col]).endswith("+05:30"), r
                assert epoch_ms(str(r[col])) == r[f"{col}_ms"], r
        runs = [r for r in rows if r["kind"] == "run"]
        assert [(r["run_id"], r["start_ms"], r["clean"]) for r in runs] == [
            (x["run_id"], x["started_ms"], x["clean"]) for x in dq["runs"]]
        for r, x in zip(runs, dq["runs"]):
            assert r["end_ms"] == (x["stopped_ms"] if x["stopped_ms"] is not None else x["last_tick_ms"])
        holes = [(r["start_ms"], r["end_ms"], r["open_ended"]) for r in rows if r["kind"] == "hole"]
        assert holes == [(h["start_ms"], h["end_ms"], h["open_ended"]) for h in dq["holes"]]
        gaps = [(r["start_ms"], r["end_ms"], r["run_id"]) for r in rows if r["kind"] == "gap"]
        assert gaps == [(g["start_ms"], g["end_ms"], g["run_id"]) for g in dq["gap_events"]]
        errors = [(r["kind"], r["gpu_uuid"], r["count"], r["start_ms"], r["end_ms"]) for r in rows
                  if r["kind"] not in ("run", "hole", "gap")]
        expected = [(e["kind"], as_sheet_text(g["uuid"]), e["count"], e["first_ms"], e["last_ms"])
                    for g in d["gpus"] for e in g["errors"]]
        expected += [(e["kind"], None, e["count"], e["first_ms"], e["last_ms"]) for e in dq["host_errors"]]
        assert sorted(errors, key=repr) == sorted(expected, key=repr)
        if db == lab_db:  # the crash: an unclean run, a hole of 40 minutes, a clean run
            assert [r["clean"] for r in runs] == [False, True]
            assert len(holes) == 1 and holes[0][1] - holes[0][0] >= 39 * 60_000
        else:
            assert {r["kind"] for r in rows} == {"run", "gap", "hole", "nvml_error", "init_failed"}
            nvml = next(r for r in rows if r["kind"] == "nvml_error")
            assert (nvml["gpu"], nvml["start"]) == (1, "2024-01-01T05:30:01.500+05:30")


# ---------------------------------------------------------------- names other users chose

def test_text_cells_are_neutralised_in_every_table(hand_db):
    cells: dict[str, set[str]] = {}
    for name in TABLES:
        r = subprocess.run([sys.executable, "-m", "gua_report", "--db", hand_db, *HAND_WINDOW, "--format", "csv",
                            "--table", name], capture_output=True, timeout=50)
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        # A spreadsheet ends a row at a bare CR too: every CR is inside a quoted cell.
        assert all(line.startswith('"') for line in out.split("\n") if "\r" in line.split('"', 1)[0]), name
        rows = list(csv.reader(io.StringIO(out, newline="")))
        assert {len(row) for row in rows} == {len(rows[0])}, name
        for row in rows:
            for cell in row:
                if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                    assert _NUMBER.fullmatch(cell), (name, row, cell)
        cells[name] = {c for row in rows for c in row}
    identity = by_name(table(hand_db, "identity", *HAND_WINDOW))
    assert [r["user"] for r in identity] == ["'" + EVIL_USER, "alice"]
    assert "'" + EVIL_USER in cells["unit"] and "'" + EVIL_UNIT in cells["unit"]
    assert "'" + EVIL_GPU in cells["gpu"]
    assert all("'" + EVIL_UUID in cells[name] for name in ("gpu", "hour", "event"))
    assert {"'" + EVIL_GAP, "'" + EVIL_NVML, "'" + EVIL_INIT} <= cells["event"]
    assert any(EVIL_HOST in c for c in cells["event"])  # in the run's detail, not at its start: no formula


# ---------------------------------------------------------------- the command line

def test_table_needs_format_csv(hand_db):
    for args in (("--table", "gpu"), ("--format", "json", "--table", "gpu"), ("--format", "text", "--table", "unit"),
                 ("--format", "csv", "--table", "gpu", "--ssh", "gpu01"), ("--format", "csv", "--table", "users")):
        r = run_report("--db", hand_db, *HAND_WINDOW, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stdout == "", args
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("gua-report: error: argument --table"), args


def test_csv_without_table_is_the_long_table(hand_db):
    r = run_report("--db", hand_db, *HAND_WINDOW, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["section", "subject", "metric", "value"]
    assert ["report", "", "format_version", "2"] in rows


def test_help_and_man_page_name_the_tables():
    r = run_report("--help", env={"COLUMNS": "80"})
    assert "--table {gpu,identity,unit,hour,heatmap,event}" in r.stdout
    man = (Path(__file__).resolve().parent.parent / "packaging" / "man" / "gua-report.1").read_text()
    assert r"\-\-table" in man and "2026-11-28T10:00:00+05:30" in man


@pytest.mark.parametrize("name", ["gpu", "hour", "event"])
def test_a_table_loads_nothing_costly(hand_db, name):
    loaded = modules_after("--db", hand_db, *HAND_WINDOW, "--format", "csv", "--table", name)
    assert "gua_report.render_table" in loaded
    assert not loaded & set(COSTLY), loaded & set(COSTLY)
