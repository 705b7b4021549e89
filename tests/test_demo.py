"""README's demo (demo.sh): a week through the real collector, the report, then `now` and both checks live."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv that runs the tests has gua-collector and gua-report


def test_demo_shows_the_report_now_and_both_checks(tmp_path: Path) -> None:
    r = subprocess.run([str(REPO / "demo.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "GUA_BIN": str(BIN)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    commands = re.findall(r"^\$ (\S+(?: \S+)?)", out, re.M)
    assert commands == ["gua-collector --db", "gua-report --db", "gua-collector --db", "gua-report now",
                        "gua-report now", "gua-collector --check", "kill -TERM"], commands
    for section in ("GPU TIME", "TOP IDENTITIES", "DATA QUALITY", "ABANDONED", "WAITING ON CPU"):
        assert section in out, section
    # bob's notebook from the week holds GPU 1: idle since the simulated week, seen live.
    assert re.search(r"^\s+1\s+30001 bob\s", out, re.M), out
    check = re.search(r"^GUA (OK|WARNING|CRITICAL) - .*\| idle_held_procs=\d+", out, re.M)
    assert check, out
    assert f"(exit {('OK', 'WARNING', 'CRITICAL').index(check.group(1))})" in out
    assert "OK    collector: running and recording" in out and re.search(r"^0 failed, .*\n\(exit 0\)$", out, re.M)
    # The live run stopped cleanly on SIGTERM (else exit 1) and its log is gone; the database stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.db"]


def test_demo_refuses_to_write_into_an_existing_database(tmp_path: Path) -> None:
    (tmp_path / "demo.db").write_bytes(b"precious")
    r = subprocess.run([str(REPO / "demo.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GUA_BIN": str(BIN)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "demo.db exists" in r.stderr
    assert (tmp_path / "demo.db").read_bytes() == b"precious"
