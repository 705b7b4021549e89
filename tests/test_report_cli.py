"""gua-report's command line as an admin meets it: hostile strings, --user, JSON errors, help.

Any local account chooses its process names and cgroup paths, and the host
and driver choose host and GPU names (DESIGN.md, threat model): none of
that may reach the admin's terminal or spreadsheet as a command.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from gua_report.render_json import FORMAT_VERSION
from report_helpers import HOUR, T0, G, HandDb, Hostile, P, hostile_db, run_report

pytestmark = pytest.mark.timeout(60)

WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z", "--tz", "UTC")
MAN = Path(__file__).resolve().parent.parent / "packaging" / "man" / "gua-report.1"

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# What each hostile string is made of: CSI and OSC sequences, C1 CSI, DEL,
# line breaks, a TAB, every bidi control, a zero-width space.
EVIL_USER = "=evil\x1b[2J\u202eroot\nFAKE LINE"
EVIL_UNIT = "unit:+x\u2066\t\u200b.service"
EVIL_GPU = "NVIDIA =H100\x1b[31m\u202eEVIL"
EVIL_HOST = "@gpu\r01\u061c\x9b31m"
EVIL_GAP = "-gap\x1b[8m hidden\u202e"
EVIL_NVML = "+err\x1b[5m\u2069" + BIDI
EVIL_INIT = "@init\x1b[0m\n  FAKE: ok\x7f"
EVIL = (EVIL_USER, EVIL_UNIT, EVIL_GPU, EVIL_HOST, EVIL_GAP, EVIL_NVML, EVIL_INIT)
EVIL_STRINGS = Hostile(EVIL_USER, EVIL_UNIT, EVIL_HOST, EVIL_GAP, EVIL_NVML, EVIL_INIT)


@pytest.fixture(scope="module")
def evil_db(tmp_path_factory) -> str:
    """A database whose every string is hostile, beside ordinary rows to compare with."""
    # created_ms negative: a number that must stay a number in CSV
    return hostile_db(str(tmp_path_factory.mktemp("evil") / "gua.db"), EVIL_STRINGS, {}, {"name": EVIL_GPU},
                      evil_on=1, created_ms=-1500)


def _inert(text: str) -> None:
    """Nothing but printable ASCII and newlines: no control, no bidi, no invisible format."""
    for ch in text:
        assert ch == "\n" or " " <= ch <= "~", (repr(ch), unicodedata.name(ch, "?"))


# ---------------------------------------------------------------- item 1: escaping

def test_text_escapes_every_hostile_string(evil_db):
    r = run_report("--db", evil_db, *WINDOW)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    _inert(out)
    lines = out.splitlines()
    assert max(len(x) for x in lines) <= 80, max(lines, key=len)
    assert not any(x.lstrip().startswith("FAKE") for x in lines), out  # no forged lines
    # Each string is shown, visibly escaped.
    assert "gua-report: @gpu\\r01\\u061c\\x9b31m" in lines[0]
    assert "=H100\\x1b[31m\\u202e~" in out  # cut to the column's 20 characters
    assert "=evil\\x1b[2J\\u202eroot\\nFAKE LINE" in out
    assert "unit:+x\\u2066\\t\\u200b.service" in out
    assert "-gap\\x1b[8m hidden\\u202e" in out
    assert "+err\\x1b[5m\\u2069\\u061c" in out  # the rest is cut at 80 columns
    assert "@init\\x1b[0m\\n  FAKE: ok\\x7f" in out


def test_text_columns_keep_their_widths(evil_db):
    """An escaped name takes as many columns as it has characters: tables stay aligned."""
    out = run_report("--db", evil_db, *WINDOW, "--user", EVIL_USER, "--user", "alice").stdout
    lines = out.splitlines()
    gpu_rows = [x for x in lines if re.match(r"^ +[01] [^ ]", x)]
    assert len(gpu_rows) == 2
    assert [m.start() for m in re.finditer("%", gpu_rows[0])] == [m.start() for m in re.finditer("%", gpu_rows[1])]
    header = next(x for x in lines if x.startswith("  user "))
    rows = lines[lines.index(header) + 1:lines.index(header) + 3]
    assert {len(x) for x in rows} == {len(header)}, (header, rows)
    assert any(x.startswith("  =evil\\x1b[2J\\u202eroot\\nFAKE") for x in rows)
    assert "filter: users =evil\\x1b[2J\\u202eroot\\nFAKE LINE,alice" in out


def test_error_messages_are_escaped_too(evil_db, tmp_path):
    """A path or a --user value quoted in an error cannot act on the terminal either."""
    missing = str(tmp_path / "x\x1b[2J\u202e.db")
    r = run_report("--db", missing, *WINDOW)
    assert r.returncode == 3
    assert "x\\x1b[2J\\u202e.db" in r.stderr and "\x1b" not in r.stderr and "\u202e" not in r.stderr
    r = run_report("--db", evil_db, *WINDOW, "--user", "bob\x1b[2J")
    assert r.returncode == 2
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr and "\n" not in r.stderr.rstrip("\n")
    assert "=evil\\x1b[2J\\u202eroot\\nFAKE LINE" in r.stderr  # the known users, escaped


def test_non_ascii_names_are_escaped_in_text_kept_in_json(tmp_path):
    """The text report stays ASCII (one character, one column, any locale); JSON is exact."""
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    p = db.process(1, db.account("jörg", 1001))
    db.ticks(db.run(T0), T0, 10, 10_000, G(g, util=0, procs=(P(p),)), first_duration=0)
    db.close()
    r = run_report("--db", path, *WINDOW, env={"PYTHONIOENCODING": "latin-1"})
    assert r.returncode == 0, r.stderr
    assert "j\\xf6rg" in r.stdout
    r = run_report("--db", path, *WINDOW, env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr  # a C-locale terminal cannot fail on a name
    assert json.loads(run_report("--db", path, *WINDOW, "--format", "json").stdout)[
        "identities"]["users"][0]["user"] == "jörg"


def test_csv_neutralises_formulas_and_keeps_numbers(evil_db):
    # Bytes, not text=True: universal newlines would turn a bare CR into a line feed.
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", evil_db, *WINDOW, "--format", "csv"],
                       capture_output=True, timeout=50)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    # A spreadsheet ends a row at a bare CR too: every CR must be inside a quoted cell.
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert {len(row) for row in rows} == {4}, [row for row in rows if len(row) != 4]
    assert all(line.startswith('"') for line in out.split("\n") if "\r" in line.split('"', 1)[0])
    number = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
    for row in rows:
        for cell in row:
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                assert number.fullmatch(cell), (row, cell)
    cells = {c for row in rows for c in row}
    assert "'" + EVIL_USER in cells  # the subject and the value of the user rows
    assert "'" + EVIL_HOST in cells
    assert "'" + EVIL_GAP in cells
    assert "'" + EVIL_NVML in cells
    assert "'" + EVIL_INIT in cells
    assert "'" + EVIL_USER + "/" + EVIL_UNIT in cells
    assert ["database", "", "created_ms", "-1500"] in rows  # a negative number stays a number
    assert ["gpu", "GPU-0000-0001", "name", EVIL_GPU] in rows  # not a formula: unchanged


def test_json_keeps_strings_exact(evil_db):
    r = run_report("--db", evil_db, *WINDOW, "--format", "json")
    assert r.returncode == 0, r.stderr
    _inert(r.stdout)  # json.dumps escapes them itself
    d = json.loads(r.stdout)
    assert d["database"]["hostnames"] == [EVIL_HOST]
    assert {g["name"] for g in d["gpus"]} == {"NVIDIA H100 80GB HBM3", EVIL_GPU}
    assert {u["user"] for u in d["identities"]["users"]} == {EVIL_USER, "alice"}
    assert d["identities"]["units"][0]["unit"] == EVIL_UNIT
    assert d["data_quality"]["gap_events"][0]["detail"] == EVIL_GAP
    assert d["data_quality"]["host_errors"][0]["last_detail"] == EVIL_INIT
    assert d["gpus"][1]["errors"][0]["last_detail"] == EVIL_NVML
    assert d["database"]["created_ms"] == -1500


# ---------------------------------------------------------------- item 3: --user

def test_user_filter_says_what_it_filters(evil_db):
    everyone = json.loads(run_report("--db", evil_db, *WINDOW, "--format", "json").stdout)
    alice = json.loads(run_report("--db", evil_db, *WINDOW, "--format", "json", "--user", "alice").stdout)
    # The card-level sections are the same with or without --user ...
    for key in ("headline", "gpus", "heatmap", "energy", "idle_capacity"):
        assert alice[key] == everyone[key], key
    # ... the identities are filtered.
    assert [u["user"] for u in alice["identities"]["users"]] == ["alice"]
    assert alice["filters"]["users"] == ["alice"]
    text = run_report("--db", evil_db, *WINDOW, "--user", "1001").stdout
    lines = text.splitlines()
    n = lines.index("filter: users 1001")
    assert "TOP IDENTITIES" in lines[n + 1] and "only" in lines[n + 1]
    assert "whole GPUs" in lines[n + 2]
    assert max(len(x) for x in lines) <= 80
    assert "alice" in text and "evil" not in text


def test_known_user_without_samples_is_not_an_error(evil_db):
    r = run_report("--db", evil_db, *WINDOW, "--user", "carol")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("no process of carol held a GPU in this window") == 1
    d = json.loads(run_report("--db", evil_db, *WINDOW, "--user", "carol", "--format", "json").stdout)
    assert d["identities"] == {"users": [], "units": []}


def test_unknown_user_lists_at_most_twenty(tmp_path):
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    p = db.process(1, db.account("u00", 2000))
    for n in range(1, 25):
        db.account(f"u{n:02d}", 2000 + n)
    db.ticks(db.run(T0), T0, 10, 10_000, G(g, util=0, procs=(P(p),)), first_duration=0)
    db.close()
    r = run_report("--db", path, *WINDOW, "--user", "u0")
    assert r.returncode == 2
    assert r.stderr.strip() == ("gua-report: error: no user matches --user 'u0' (users in this database: "
                                + ", ".join(f"u{n:02d}" for n in range(20)) + ", and 5 more)")


# ---------------------------------------------------------------- item 7: JSON errors

def _json_error(r, code: int, needle: str) -> dict:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    d = json.loads(r.stdout)
    assert d["format_version"] == FORMAT_VERSION
    assert d["error"]["code"] == code
    assert needle in d["error"]["message"]
    assert len(r.stderr.splitlines()) == 1 and needle in r.stderr  # humans still get their line
    return d


def test_json_empty_window_prints_a_json_error(evil_db):
    r = run_report("--db", evil_db, "--since", "2023-12-01T00:00Z", "--until", "2023-12-02T00:00Z",
                   "--tz", "UTC", "--format", "json")
    d = _json_error(r, 8, "no samples between 2023-12-01 00:00 and 2023-12-02 00:00")
    assert set(d) == {"format_version", "generator", "error"}
    assert set(d["error"]) == {"code", "message"}


def test_json_other_errors_after_parsing(evil_db, tmp_path):
    _json_error(run_report("--db", str(tmp_path / "nope.db"), *WINDOW, "--format", "json"), 3, "does not exist")
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    _json_error(run_report("--db", str(tmp_path / "notes.txt"), *WINDOW, "--format", "json"), 5, "not a SQLite")
    _json_error(run_report("--db", evil_db, *WINDOW, "--format", "json", "--since", "800000d"), 2, "--since")
    d = _json_error(run_report("--db", evil_db, *WINDOW, "--format", "json", "--user", "bob"), 2, "--user 'bob'")
    assert EVIL_USER in d["error"]["message"]  # exact in JSON, as every JSON string
    _inert(run_report("--db", evil_db, *WINDOW, "--format", "json", "--user", "bob").stdout)
    _json_error(run_report("--db", evil_db, *WINDOW, "--format", "json", "--gpu", "7"), 2, "no GPU matches")


def test_usage_errors_and_other_formats_print_nothing_on_stdout(evil_db):
    """argparse's own errors come before the format is known; text and CSV stay quiet."""
    r = run_report("--db", evil_db, *WINDOW, "--format", "json", "--no-such-option")
    assert r.returncode == 2 and r.stdout == ""
    for fmt in ("text", "csv"):
        r = run_report("--db", evil_db, "--since", "2023-12-01", "--until", "2023-12-02", "--format", fmt)
        assert r.returncode == 8 and r.stdout == ""


# ---------------------------------------------------------------- items 6, 9: times, help, man page

def test_journalctl_times_on_the_command_line(evil_db):
    """`--since '2024-01-01 00:05'` and friends reach the report; `--since today` on old data is empty."""
    d = json.loads(run_report("--db", evil_db, "--since", "2024-01-01 00:05", "--until", "2024-01-01 01:00 UTC",
                              "--tz", "UTC", "--format", "json").stdout)
    assert (d["window"]["since_ms"], d["window"]["until_ms"]) == (T0 + 5 * 60_000, T0 + HOUR)
    r = run_report("--db", evil_db, "--since", "today", "--tz", "UTC")
    assert r.returncode == 8, r.stderr
    r = run_report("--db", evil_db, "--since", "-2h", "--until", "2024-01-01")
    assert r.returncode == 2 and "must be before" in r.stderr


def test_help_fits_80_columns_and_documents_the_options():
    r = run_report("--help", env={"COLUMNS": "80"})
    assert r.returncode == 0
    assert max(len(x) for x in r.stdout.splitlines()) <= 80
    for needle in ("--color {auto,always,never}", "NO_COLOR", "TERM", "yesterday", "-2h",
                   "'YYYY-MM-DD HH:MM[:SS]'", "only 0 may", "identities section only",
                   '"error": {"code"', "unknown --gpu or --user", " 10  merge: a FILE",
                   " 11  merge, --ssh"):
        assert needle in r.stdout, needle


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_page_fits_80_columns_and_documents_the_options():
    r = subprocess.run(["groff", "-man", "-Tascii", "-rLL=78n", "-ww", str(MAN)], capture_output=True,
                       text=True, timeout=30, env={**os.environ, "MANWIDTH": "80"})
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    page = re.sub(r".\x08", "", r.stdout)  # overstrike bold/underline
    assert max(len(x) for x in page.splitlines()) <= 80
    flat = " ".join(page.split())
    for needle in ("--color", "always", "never", "NO_COLOR", "non-empty", "TERM", "dumb", "yesterday",
                   "today", "-2h", "YYYY-MM-DD HH:MM", "ago", "refused", "no unit", "escape",
                   "formula", "whole GPUs", '"error"', "format_version"):
        assert needle in flat, needle


def test_a_command_word_after_the_options_says_that_the_command_comes_first(tmp_path):
    """`gua-report --db X now` is exit 2 with the way to say it, not a bare 'unrecognized arguments'."""
    for command in ("now", "merge"):
        r = run_report("--db", str(tmp_path / "gua.db"), command)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and f"the command comes first: gua-report {command} [OPTIONS]" in r.stderr
    r = run_report("--db", str(tmp_path / "gua.db"), "--since", "now")  # a value, not the command
    assert r.returncode == 2 and "command comes first" not in r.stderr
