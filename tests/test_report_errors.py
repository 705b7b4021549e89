"""Every gua-report failure: one line on stderr, no traceback, its own exit code."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest

from gua_report.opendb import SCHEMA_VERSION
from gua_report.render_json import FORMAT_VERSION
from report_helpers import HOUR, T0, G, HandDb, P, run_report

pytestmark = pytest.mark.timeout(60)

WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z", "--tz", "UTC")


@pytest.fixture()
def good_db(tmp_path) -> str:
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g0 = db.gpu(0)
    a = db.account("alice", 1001)
    p = db.process(100, a)
    r = db.run(T0)
    db.ticks(r, T0, 30, 10_000, G(g0, util=500, procs=(P(p, mem=2000, sm=50),)), first_duration=0)
    db.close()
    return path


def one_line_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gua-report: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_ok(good_db):
    r = run_report("--db", good_db, *WINDOW)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_missing(tmp_path):
    r = run_report("--db", str(tmp_path / "nope.db"), *WINDOW)
    one_line_error(r, 3, "does not exist")
    assert not os.path.exists(tmp_path / "nope.db")  # never created


def test_missing_default_path_mentions_option(tmp_path):
    r = run_report(*WINDOW, "--db", str(tmp_path / "sub" / "gua.db"))
    one_line_error(r, 3, "--db")


def test_empty_sqlite_is_not_gua(tmp_path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # zero bytes
    one_line_error(run_report("--db", str(path), *WINDOW), 5, "not a gua database")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    one_line_error(run_report("--db", str(path), *WINDOW), 5, "another program")


def test_text_file_is_not_gua(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("alice: please free GPU 3\n" * 100)
    one_line_error(run_report("--db", str(path), *WINDOW), 5, "not a SQLite database")


def test_directory_is_not_gua(tmp_path):
    one_line_error(run_report("--db", str(tmp_path), *WINDOW), 5, "not a regular file")


def test_meta_of_other_application(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('application', 'other')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    one_line_error(run_report("--db", str(path), *WINDOW), 5, "not a gua database")


def test_newer_schema(good_db):
    conn = sqlite3.connect(good_db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    one_line_error(run_report("--db", good_db, *WINDOW), 6, f"schema version {SCHEMA_VERSION + 1}",
                   f"understands ({SCHEMA_VERSION})", "upgrade")


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_magic(good_db):
    _patch(good_db, 0, b"SQLite format 9\x00")
    one_line_error(run_report("--db", good_db, *WINDOW), 7, "corrupt")


def test_corrupt_header_fields(good_db):
    _patch(good_db, 16, b"\x00\x03\xff\xff\xff\xff\xff\xff")  # page size 3, bad versions, bad reserve
    one_line_error(run_report("--db", good_db, *WINDOW), 7, "corrupt")


def test_corrupt_schema_page(good_db):
    _patch(good_db, 100, os.urandom(0) + b"\x0d" + b"\xff" * 400)  # page 1 b-tree header mangled
    one_line_error(run_report("--db", good_db, *WINDOW), 7, "corrupt")


def test_corrupt_data_page(good_db):
    size = os.path.getsize(good_db)
    page = sqlite3.connect(good_db).execute("PRAGMA page_size").fetchone()[0]
    for n in range(2, size // page):  # every page but the schema page
        _patch(good_db, n * page, b"\xff" * 64)
    one_line_error(run_report("--db", good_db, *WINDOW), 7, "corrupt")


@pytest.mark.parametrize("args,needle", [
    (("--since", "yesterday-ish"), "cannot read time"),
    (("--until", "2024-13-45"), "cannot read time"),
    (("--format", "xml"), "invalid choice"),
    (("--tz", "Mars/Olympus_Mons"), "unknown time zone"),
    (("--gpu", "9"), "no GPU matches"),
    (("--active-threshold", "150"), "between 0 and 100"),
    (("--held-threshold", "lots"), "cannot read size"),
    (("--since", "2024-01-02", "--until", "2024-01-01"), "must be before"),
    (("--no-such-option",), "unrecognized arguments"),
    # Out of range: a one-line error naming the option, not a traceback (exit 1).
    (("--since", "800000d"), "argument --since"),
    (("--since", "9999999999999999999999w"), "argument --since"),
    (("--since", "1" * 5000 + "d"), "argument --since"),
    (("--until", "0001-01-01"), "argument --until"),
    (("--until", "9999-12-31T23:59"), "argument --until"),
    (("--until", "@99999999999999"), "argument --until"),
    (("--since", "+2h"), "argument --since"),
    (("--held-threshold", "99999999999999999999999TB"), "argument --held-threshold"),
    (("--held-threshold", "1e400MB"), "argument --held-threshold"),
    (("--held-threshold", "5"), "no unit"),
    (("--active-threshold", "1e400"), "argument --active-threshold"),
    (("--active-threshold", "nan"), "argument --active-threshold"),
    (("--tz", "../../../etc/passwd"), "argument --tz"),
    (("--since", "\x1b[2J\u202e7d"), "\\x1b[2J\\u202e7d"),  # shown escaped, never sent
    (("--user", "nobody-here"), "no user matches --user 'nobody-here' (users in this database: alice)"),
    (("--user", "1002"), "no user matches --user '1002'"),
    (("--no-such-option", "\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07"),
])
def test_bad_arguments(good_db, args, needle):
    r = run_report("--db", good_db, *WINDOW, *args)
    one_line_error(r, 2, needle)
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr


def test_empty_window(good_db):
    r = run_report("--db", good_db, "--since", "2023-12-01T00:00Z", "--until", "2023-12-02T00:00Z",
                   "--tz", "UTC")
    one_line_error(r, 8, "no samples between 2023-12-01 00:00 and 2023-12-02 00:00")


def test_empty_window_for_selected_gpu(tmp_path):
    path = str(tmp_path / "gua.db")
    db = HandDb(path)
    g0, g1 = db.gpu(0), db.gpu(1)
    r = db.run(T0)
    db.ticks(r, T0, 5, 10_000, G(g0, util=0))
    db.tick(r, T0 + 2 * HOUR, 10_000, G(g1, util=0))
    db.close()
    one_line_error(run_report("--db", path, *WINDOW, "--gpu", "1"), 8, "selected GPUs")


def test_help_documents_exit_codes():
    r = run_report("--help")
    assert r.returncode == 0
    for code in ("2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "8 "):
        assert f"  {code}" in r.stdout
    assert "--no-rollups" in r.stdout


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")


@needs_root
def test_permission_denied_names_group(shared_dir, good_db):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    d = os.path.join(shared_dir, "state")
    os.mkdir(d, 0o755)
    db = os.path.join(d, "gua.db")
    shutil.copy(good_db, db)
    os.chown(db, 0, 0)
    os.chmod(db, 0o640)  # root:root 0640 and nobody is not in group root
    nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    r = run_report("--db", db, *WINDOW, user=nobody)
    one_line_error(r, 4, "permission denied reading", "root:root", "join the 'root' group")
    os.chmod(db, 0o644)
    os.chmod(d, 0o700)  # the directory closed: the file cannot even be looked up
    r = run_report("--db", db, *WINDOW, user=nobody)
    one_line_error(r, 4, "permission denied", f"directory {d}", "join the 'root' group")


def test_runs_without_collector_or_pynvml(good_db):
    """The reporter is standard library only: it runs with gua_collector and pynvml unimportable."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['gua_collector'] = None\n"
        "sys.modules['pynvml'] = None\n"
        "sys.modules['sdnotify'] = None\n"
        "from gua_report.cli import main\n"
        f"main(['--db', {good_db!r}, '--since', '2024-01-01', '--until', '2024-01-02', '--tz', 'UTC',"
        " '--format', 'json'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert f'"format_version": {FORMAT_VERSION}' in r.stdout
