"""The database file as it really is: cut short.

- A file shorter than its header says (bytes 28-31 pages of bytes 16-17
  bytes, valid when bytes 24-27 equal bytes 92-95) is corrupt: exit 7, not a
  report with rows silently missing. SQLite itself reads the missing pages
  as zeros.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from collector_helpers import clean_env, run_collector

pytestmark = pytest.mark.timeout(300)

TICKS = 2 * 8640  # two days of 10 s ticks, ending now


@pytest.fixture(scope="module")
def stopped_db(tmp_path_factory) -> str:
    """Two days written by the real collector (fast-forward, ending now), stopped cleanly."""
    path = str(tmp_path_factory.mktemp("files") / "gua.db")
    r = run_collector("--db", path, "--backend", "simulate:lab", "--ticks", str(TICKS), "--interval", "10s",
                      timeout=240)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(path + "-wal")
    return path


def copy_of(src: str, directory) -> str:
    dst = str(directory / "gua.db")
    shutil.copy(src, dst)
    return dst


# ---------------------------------------------------------------- a file cut short

@pytest.mark.parametrize("cut", [100, 700, 1300, 2000, 4096, 3 * 4096 + 5])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_truncated_file_is_corrupt(stopped_db, tmp_path, cut, fmt):
    path = copy_of(stopped_db, tmp_path)
    os.truncate(path, os.path.getsize(path) - cut)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", fmt],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 7, (r.returncode, r.stderr, r.stdout[:300])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gua-report: error: ")
    assert "is corrupt (truncated: " in r.stderr
    assert "but its header counts" in r.stderr
    if fmt == "text":
        assert r.stdout == ""


def test_healthy_and_header_size_rules(stopped_db, tmp_path):
    """The same file whole reports; a header page count that is not valid is not used."""
    path = copy_of(stopped_db, tmp_path)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", "json"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(g["last_status"] == "ok" for g in json.loads(r.stdout)["gpus"])
    # Version-valid-for (92-95) no longer equal to the change counter (24-27): SQLite
    # ignores the header's page count and uses the file's size, and so does the check.
    with open(path, "r+b") as f:
        f.seek(92)
        valid_for = int.from_bytes(f.read(4), "big")
        f.seek(92)
        f.write((valid_for + 1).to_bytes(4, "big"))
    os.truncate(path, os.path.getsize(path) + 4096)  # one more (empty) page than the header counts
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d", "--format", "json"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    # ...but a partial page at the end is still a file cut short
    os.truncate(path, os.path.getsize(path) - 100)
    r = subprocess.run([sys.executable, "-m", "gua_report", "--db", path, "--since", "1d"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 7 and "not a whole number of 4096-byte pages" in r.stderr, r.stderr
