"""Active but starved: GPU time that is active by utilization while GPM says almost no SM was busy.

simulate:gpm through the collector's real write path (SimBackend -> Sampler
-> Store, which rolls up): card 0 runs carol's spin kernel (utilization
100 %, SM activity ~0.8 %), card 1 alice's training (GPM following its
utilization) with bob's idle notebook beside it, cards 2 and 3 have no GPM.
Every plan path (hourly rollups, histograms, raw rows, a +05:30 zone) must
give the same numbers; per identity, the histograms do not record it and
say so (null, never 0).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading

import pytest

from report_helpers import run_report

pytestmark = pytest.mark.timeout(180)

START = 1_772_443_800_000  # 2026-03-02 09:30 UTC, a Monday: alice's training runs
END = START + 3 * 3_600_000  # 12:30: hours 10 and 11 are rolled up
WINDOW = ("--since", "2026-03-02T09:30:00Z", "--until", "2026-03-02T12:30:00Z")
INTERVAL_S = 30


@pytest.fixture(scope="module")
def gpm_db(tmp_path_factory) -> str:
    from gua_collector.clock import SimClock
    from gua_collector.sampler import Sampler
    from gua_collector.simulate import SimBackend
    from gua_collector.store import Store

    path = str(tmp_path_factory.mktemp("starved") / "gua.db")
    clock = SimClock(START)
    backend = SimBackend("gpm", clock)
    backend.init()
    sampler = Sampler(backend)
    store = Store.open(path, now_ms=START)
    store.begin_run(START, INTERVAL_S * 1000, "simulate:gpm", "gpu01", "test")
    ticks = []
    first = True
    while clock.wall_ms() < END:
        ticks.append(sampler.tick(clock.wall_ms(), 0 if first else INTERVAL_S * 1000))
        first = False
        clock.sleep(INTERVAL_S, threading.Event())
    for n in range(0, len(ticks), 100):
        store.write_ticks(ticks[n:n + 100])
    store.close()
    return path


def report(path: str, *args: str) -> dict:
    r = run_report("--db", path, "--format", "json", *WINDOW, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by_index(rep: dict) -> dict[int, dict]:
    return {g["index"]: g for g in rep["gpus"]}


def users(rep: dict) -> dict[str, dict]:
    return {u["user"]: u for u in rep["identities"]["users"]}


def test_spin_kernel_is_starved_training_is_not_and_no_gpm_is_unknown(gpm_db):
    rep = report(gpm_db)
    assert rep["source"]["rollups"] == "hourly" and rep["source"]["rollup_hours"] == 2
    g = by_index(rep)
    spin, training = g[0], g[1]
    assert spin["active_ms"] > 2 * 3_600_000
    assert spin["starved_ms"] == spin["active_ms"], "the spin kernel's active time is all starved"
    assert spin["gpm_known_ms"] >= spin["active_ms"] - 60_000
    assert 0 < spin["sm_activity"] < 0.01 and spin["tensor_activity"] == 0
    assert training["active_ms"] > 0 and training["starved_ms"] == 0, "training keeps its SMs busy"
    assert training["gpm_known_ms"] > 0 and training["sm_activity"] > 0.3
    for n in (2, 3):
        assert g[n]["gpm_known_ms"] == 0
        assert (g[n]["sm_activity"], g[n]["tensor_activity"], g[n]["starved_ms"]) == (None, None, None), \
            "no GPM: unknown, never 0"
    assert rep["headline"]["starved_ms"] == spin["starved_ms"]
    assert rep["rules"]["starved_sm_permille"] == 50
    assert rep["gpus"][0]["starved_gpu_hours"] == round(spin["starved_ms"] / 3_600_000, 4)


def test_per_identity_starved_goes_to_the_spinner(gpm_db):
    u = users(report(gpm_db))
    carol, alice = u["carol"], u["alice"]
    assert carol["starved_ms"] > 2 * 3_600_000 and carol["starved_ms"] == carol["gpm_busy_ms"]
    assert alice["gpm_busy_ms"] > 0 and alice["starved_ms"] == 0
    # bob never ran SM work: no busy time where GPM was known, so unknown, not 0
    assert u["bob"]["gpm_busy_ms"] == 0 and u["bob"]["starved_ms"] is None
    spin = by_index(report(gpm_db))[0]
    assert carol["starved_ms"] <= spin["starved_ms"]


def _strip_identity_starved(rep: dict) -> dict:
    rep = json.loads(json.dumps(rep))
    del rep["source"]
    del rep["data_quality"]["identity_starved_known"]
    for kind in ("users", "units"):
        for i in rep["identities"][kind]:
            for k in ("gpm_busy_ms", "starved_ms", "starved_gpu_hours"):
                del i[k]
    return rep


@pytest.mark.parametrize("args", [(), ("--tz", "Asia/Kolkata"), ("--active-threshold", "30"),
                                  ("--active-threshold", "30", "--tz", "Asia/Kolkata"),
                                  ("--held-threshold", "300MB")])
def test_every_plan_path_gives_the_raw_numbers(gpm_db, args):
    rolled = report(gpm_db, *args)
    raw = report(gpm_db, *args, "--no-rollups")
    assert rolled["source"]["rollups"] != "none" and raw["source"]["rollups"] == "none"
    assert by_index(rolled)[0]["starved_ms"] > 0
    if rolled["source"]["rollups"] == "histograms":
        # Per identity the histograms do not record it: unknown on that path, stated.
        assert rolled["data_quality"]["identity_starved_known"] is False
        assert all(i["starved_ms"] is None and i["gpm_busy_ms"] is None
                   for i in rolled["identities"]["users"] + rolled["identities"]["units"])
        assert users(raw)["carol"]["starved_ms"] > 0
        assert _strip_identity_starved(rolled) == _strip_identity_starved(raw)
    else:
        del rolled["source"], raw["source"]
        assert rolled == raw


def test_hours_rolled_up_before_gpm_are_not_recorded_on_every_path(gpm_db, tmp_path):
    """An upgraded database: hours rolled up before schema 3's GPM columns hold 0 there, and the raw
    path counts GPM from meta gpm_since_hour too, so both give the same (smaller) numbers."""
    path = str(tmp_path / "old.db")
    shutil.copy(gpm_db, path)
    conn = sqlite3.connect(path)
    since = START // 3_600_000 + 2  # 11:00
    conn.execute("UPDATE meta SET value = ? WHERE key = 'gpm_since_hour'", (str(since),))
    conn.execute("UPDATE hour_gpu SET gpm_known_ms = 0, sm_active_pm_ms = 0, tensor_known_ms = 0, "
                 "tensor_active_pm_ms = 0, starved_ms = 0 WHERE hour < ?", (since,))
    conn.execute("UPDATE hour_gpu_hist SET gpm_known_ms = 0, sm_active_pm_ms = 0, tensor_known_ms = 0, "
                 "tensor_active_pm_ms = 0, gpm_low_ms = 0 WHERE hour < ?", (since,))
    for table in ("hour_account", "hour_unit"):
        conn.execute(f"UPDATE {table} SET gpm_busy_ms = 0, starved_ms = 0 WHERE hour < ?", (since,))
    conn.commit()
    conn.close()
    full = by_index(report(gpm_db))[0]
    rolled, raw = report(path), report(path, "--no-rollups")
    spin = by_index(rolled)[0]
    assert 0 < spin["starved_ms"] < full["starved_ms"] - 3_000_000
    assert rolled["data_quality"]["gpm_recorded_since_ms"] == since * 3_600_000
    del rolled["source"], raw["source"]
    assert rolled == raw


def test_text_shows_sm_activity_and_starved_time_in_80_columns(gpm_db):
    r = run_report("--db", gpm_db, *WINDOW, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    head = next(line for line in lines if line.strip().startswith("#") and "SM act" in line)
    assert head
    starved = next(line for line in lines if "active-but-starved:" in line)
    assert "util >= 10 %" in starved and "SM activity < 5 %" in starved
    assert not starved.split("active-but-starved:")[1].strip().startswith("0.00")
    assert any("busy on a starved GPU" in line and "carol" in line for line in lines)
    spin = next(line for line in lines if line.strip().startswith("0 ") and "H100" in line)
    assert "starved 3.0h" in spin and any(f"0.{n}%" in spin for n in (7, 8, 9))
    no_gpm = next(line for line in lines if line.strip().startswith("2 "))
    assert " -%" in no_gpm


def test_csv_long_format_carries_the_new_fields(gpm_db):
    r = run_report("--db", gpm_db, *WINDOW, "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert "starved_ms" in r.stdout and "sm_activity" in r.stdout and "gpm_busy_ms" in r.stdout


def test_the_first_gpm_value_is_noted_and_a_database_without_one_reads_no_gpm_column(gpm_db, tmp_path):
    """meta gpm_first_ms: the first tick that stored a GPM value (a run's first tick has none); a database
    without it (no Hopper GPU) has its raw queries leave the GPM columns out, at no cost to the numbers."""
    from gua_report import query

    conn = sqlite3.connect(f"file:{gpm_db}?mode=ro", uri=True)
    first = conn.execute("SELECT min(t.ts_ms) FROM tick t JOIN gpu_sample g USING (tick_id) "
                         "WHERE g.sm_active_permille IS NOT NULL").fetchone()[0]
    assert first > START and conn.execute("SELECT value FROM meta WHERE key = 'gpm_first_ms'").fetchone() == (
        str(first),)
    assert query.gpm_facts(conn).seen
    conn.close()
    # the lab scenario (no GPM): no note, no GPM column in a raw read
    from report_helpers import build_store_db

    lab = build_store_db(str(tmp_path / "lab.db"), "lab", START, START + 3_600_000, 60_000)
    conn = sqlite3.connect(f"file:{lab}?mode=ro", uri=True)
    gpm = query.gpm_facts(conn)
    assert not gpm.seen and conn.execute("SELECT 1 FROM meta WHERE key = 'gpm_first_ms'").fetchone() is None

    class Spy:
        sql = ""

        def execute(self, sql, params=()):
            Spy.sql += sql
            return conn.execute(sql, params)

    rows = query.gpu_state_raw(Spy(), START, START + 3_600_000, 100, 10**8, None, None, gpm)
    assert "sm_active_permille" not in Spy.sql and rows
    assert rows == query.gpu_state_raw(conn, START, START + 3_600_000, 100, 10**8, None, None, query.CURRENT_GPM)


def test_a_hostile_user_name_on_the_starved_line_is_escaped(gpm_db, tmp_path):
    """carol renamed to control and bidi characters (a name from /proc, chosen by a local user): the
    starved line shows it escaped, on one line, in 80 columns; JSON keeps it exact."""
    from test_report_cli import EVIL_USER

    path = str(tmp_path / "evil.db")
    shutil.copy(gpm_db, path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("UPDATE account SET username = ? WHERE username = 'carol'", (EVIL_USER,)).rowcount == 1
    r = run_report("--db", path, *WINDOW, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "busy on a starved GPU" in line)
    assert "\\x1b[2J" in line and "\\u202e" in line and "\\n" in line and len(line) <= 80
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert not any(other.startswith("FAKE LINE") for other in r.stdout.splitlines()), "no forged line"
    users = {u["user"] for u in report(path)["identities"]["users"]}
    assert EVIL_USER in users
