"""What gua-report loads at start: only what the command needs.

A one-hour report reads its rows in ~10 ms; interpreter start and imports
were ~90 ms of it. These tests hold the lazy imports in place by what ends
up in sys.modules (never by timing): --version, --help and the other
commands do not load the report's classification and SQL, and no report
loads dataclasses (with inspect), typing or urllib (with ipaddress).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse

import pytest

from gua_report.opendb import quote_path
from report_helpers import T0, G, HandDb, P, report_json

pytestmark = pytest.mark.timeout(60)

REPORT_MODULES = ("gua_report.classify", "gua_report.query")
# Standard modules that cost start-up time and that no report needs.
COSTLY = ("dataclasses", "inspect", "typing", "urllib.parse", "ipaddress", "ast")

_SHOW_MODULES = """
import json, sys
before = set(sys.modules)  # what the interpreter loaded (an editable install's finder loads urllib)
from gua_report import cli
try:
    code = cli.run(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print(json.dumps(sorted(set(sys.modules) - before)), file=sys.stderr)
"""


def modules_after(*argv: str) -> set[str]:
    """The modules `gua-report ARGV` loaded (in a fresh interpreter, beyond what it starts with)."""
    r = subprocess.run([sys.executable, "-c", _SHOW_MODULES, *argv], capture_output=True, text=True,
                       timeout=50, check=False)
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("merge", "--help"), ("now", "--help")])
def test_commands_without_a_report_load_no_report_code(argv):
    loaded = modules_after(*argv)
    assert "gua_report.cli" in loaded
    assert not loaded & set(REPORT_MODULES), argv
    if argv[0].startswith("--"):
        assert not loaded & set(COSTLY), argv
        assert "gua_report.opendb" not in loaded and "sqlite3" not in loaded


@pytest.fixture(scope="module")
def small_db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("startup") / "gua.db")
    db = HandDb(path)
    g = db.gpu(0)
    p = db.process(1, db.account("alice", 1001), unit="slurm:job_1")
    db.ticks(db.run(T0), T0, 30, 10_000, G(g, util=0, procs=(P(p, mem=500),)), first_duration=0)
    db.close()
    return path


@pytest.mark.parametrize("fmt", ["text", "json", "csv"])
def test_a_report_loads_nothing_costly(small_db, fmt):
    loaded = modules_after("--db", small_db, "--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z",
                           "--tz", "Asia/Kolkata", "--format", fmt, "--held-threshold", "1GiB")
    assert set(REPORT_MODULES) <= loaded
    assert not loaded & set(COSTLY), loaded & set(COSTLY)


@pytest.mark.parametrize("path", [
    "/var/lib/gua/gua.db", "/tmp/a b/gua.db", "/tmp/x?mode=rw#frag/gua.db", "/tmp/100%/gua.db",
    "/tmp/caf\u00e9/\u6570\u636e.db", "/tmp/~user/semi;colon,comma+plus=eq&amp@at:colon/gua.db",
    "/tmp/tab\tnl\n/gua.db", "".join(chr(c) for c in range(1, 128)),
])
def test_quote_path_is_urllib_quote(path):
    assert quote_path(path) == urllib.parse.quote(path)


def test_odd_paths_open(small_db, tmp_path):
    """Characters a URI gives meaning to, non-ASCII, and a name that is not UTF-8 at all."""
    want = report_json(small_db, "--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z")
    names = ["a?mode=rw&immutable=0#x %41.db", "caf\u00e9 100%.db"]
    if sys.platform == "linux":
        names.append(os.fsdecode(b"latin1-\xe9.db"))  # undecodable: kept as a surrogate
    for name in names:
        path = str(tmp_path / name)
        with open(small_db, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        got = report_json(path, "--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z")
        assert got["database"]["path"] == path
        del got["database"]["path"]
        assert got == {**want, "database": {k: v for k, v in want["database"].items() if k != "path"}}


@pytest.mark.parametrize("columns", ["60", "80", "132", "", "junk"])
def test_help_is_as_wide_as_argparse_makes_it(monkeypatch, columns):
    """The formatter that spares shutil wraps --help exactly as argparse's own would."""
    import argparse

    from gua_report import cli

    monkeypatch.setenv("COLUMNS", columns)
    parser = cli.make_parser()
    ours = parser.format_help()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    assert ours == parser.format_help()
