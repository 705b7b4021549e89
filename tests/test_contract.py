"""Both sides of collector/SCHEMA.md: what gua-collector writes, gua-report reads back.

Runs the real collector on the simulated backend (a fast-forwarded clock),
then gua-report --format json, and checks the report against the database
itself, classified here independently and row by row with the rules of
SCHEMA.md (small data: 360 ticks).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import defaultdict

import pytest

pytestmark = pytest.mark.timeout(120)

START = "2024-01-01T08:00"  # a Monday: alice trains from 08:00 UTC, carol's job runs, bob idles
SINCE, UNTIL = "2024-01-01T07:00Z", "2024-01-01T10:00Z"
A, H = 100, 100_000_000  # default thresholds: permille, bytes


def collect(path: str, scenario: str, start: str = START) -> None:
    cmd = [sys.executable, "-m", "gua_collector", "--db", path, "--backend", f"simulate:{scenario}",
           "--ticks", "360", "--interval", "10s", "--start", start]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr


def report(path: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "gua_report", "--db", path, "--format", "json", "--tz", "UTC",
           "--since", SINCE, "--until", UNTIL, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def classify_here(path: str, A: int = A, H: int = H) -> tuple[dict, dict]:  # noqa: N803 (SCHEMA.md's names)
    """Per-GPU state ms and per-user (held, idle_held, mem_mib_ms, unknown_mem_ms, sm_unknown), by hand."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dur = dict(conn.execute("SELECT tick_id, duration_ms FROM tick"))
    procs = defaultdict(list)
    for tick_id, gpu_id, kind, mem, sm, user in conn.execute(
        "SELECT ps.tick_id, ps.gpu_id, ps.kind, ps.mem_mib, ps.sm_util, a.username "
        "FROM proc_sample ps JOIN process p USING (proc_id) JOIN account a USING (account_id)"
    ):
        procs[(tick_id, gpu_id)].append((kind, mem, sm, user))
    uuid = dict(conn.execute("SELECT gpu_id, uuid FROM gpu"))
    gpus: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tick_id, gpu_id, status, util in conn.execute(
        "SELECT tick_id, gpu_id, status, util_permille FROM gpu_sample"
    ):
        d = dur[tick_id]
        compute = [p for p in procs[(tick_id, gpu_id)] if p[0] & 1]
        held = any(p[1] is None for p in compute) or sum(p[1] or 0 for p in compute) * 1048576 > H
        state = ("unknown" if status != 0 or util is None else
                 "active" if util >= A else "idle_held" if held else "idle")
        g = gpus[uuid[gpu_id]]
        g[state] += d
        g["total"] += d
        g["ticks"] += 1
    users: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for (tick_id, _gpu_id), plist in procs.items():
        d = dur[tick_id]
        per = defaultdict(list)
        for kind, mem, sm, user in plist:
            if kind & 1:
                per[user].append((mem, sm))
        for user, rows in per.items():
            mem_null = any(m is None for m, _ in rows)
            mem = sum(m or 0 for m, _ in rows)
            if not (mem_null or mem * 1048576 > H):
                continue
            u = users[user]
            u[0] += d
            # exactly one of: SM unknown, idle-held, busy
            if any(s is None for _, s in rows):
                u[4] += d
            elif sum(s for _, s in rows) * 10 < A:
                u[1] += d
            u[2] += mem * d
            u[3] += d if mem_null else 0
    conn.close()
    return gpus, users


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("contract") / "gua.db")
    collect(path, "lab")
    return path


def test_lab_read_back(lab):
    rep = report(lab)
    conn = sqlite3.connect(f"file:{lab}?mode=ro", uri=True)
    n_gpus = conn.execute("SELECT count(*) FROM gpu WHERE parent_id IS NULL").fetchone()[0]
    n_ticks = conn.execute("SELECT count(*) FROM tick").fetchone()[0]
    sum_d = conn.execute("SELECT sum(duration_ms) FROM tick").fetchone()[0]
    runs = conn.execute("SELECT count(*), count(stopped_ms) FROM run").fetchone()
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()

    from gua_collector import schema
    from gua_report import opendb
    from gua_report.render_json import FORMAT_VERSION

    assert rep["format_version"] == FORMAT_VERSION == 2
    assert version == schema.SCHEMA_VERSION == opendb.SCHEMA_VERSION == rep["database"]["schema_version"]
    assert n_ticks == 360
    assert len(rep["gpus"]) == n_gpus == 4
    # GPU-hours are sums of duration_ms, nothing else
    h = rep["headline"]
    assert h["ticks"] == n_gpus * n_ticks
    assert h["total_ms"] == n_gpus * sum_d
    assert h["gpu_hours"] == round(n_gpus * sum_d / 3_600_000, 4)
    assert h["active_ms"] + h["idle_held_ms"] + h["idle_ms"] + h["unknown_ms"] == h["total_ms"]
    for g in rep["gpus"]:
        assert g["total_ms"] == sum_d and g["ticks"] == n_ticks
    users = {u["user"]: u for u in rep["identities"]["users"]}
    assert {"alice", "bob"} <= set(users)
    assert "root" not in users  # Xorg (graphics only) never holds a card
    # bob's 2 GB notebook on carol's busy card is idle-held even while the card is active
    assert len(users["bob"]["gpus"]) == 2
    assert rep["data_quality"]["runs"][0]["clean"] is True and runs == (1, 1)
    assert rep["database"]["hostnames"]


def test_lab_classification_matches_schema_rules(lab):
    rep = report(lab)
    gpus, users = classify_here(lab)
    for g in rep["gpus"]:
        mine = gpus[g["uuid"]]
        assert (g["active_ms"], g["idle_held_ms"], g["idle_ms"], g["unknown_ms"]) == (
            mine["active"], mine["idle_held"], mine["idle"], mine["unknown"]), g["uuid"]
    assert got_users(rep) == {k: v for k, v in users.items() if v[0] > 0}
    assert all(u["sm_unknown_ms"] == 0 for u in rep["identities"]["users"])  # lab: SM always known


def got_users(rep: dict) -> dict[str, list[int]]:
    return {u["user"]: [u["held_ms"], u["idle_held_ms"], u["mem_mib_ms"], u["unknown_mem_ms"],
                        u["sm_unknown_ms"]]
            for u in rep["identities"]["users"]}


@pytest.mark.parametrize("scenario", ["lab", "mig"])
# Within the histograms' caps (50 %, below 1024 MiB); beyond them: tests/test_report_hist.py.
@pytest.mark.parametrize("active, held", [(500, 1_000_000_000), (250, 0), (500, 1023 * 2**20), (0, 2**20)])
def test_other_thresholds_match_schema_rules(tmp_path, scenario, active, held):
    """At other thresholds a rolled-up hour is classified from the histograms: by the same rules."""
    path = str(tmp_path / "half.db")
    collect(path, scenario, start="2024-01-01T07:30")  # hour 7 gets rolled up
    rep = report(path, "--active-threshold", f"{active / 10:g}", "--held-threshold", f"{held}B")
    assert rep["source"]["rollups"] == "histograms" and rep["source"]["rollup_hours"] == 1
    gpus, users = classify_here(path, active, held)
    for g in rep["gpus"]:
        mine = gpus[g["uuid"]]
        assert (g["active_ms"], g["idle_held_ms"], g["idle_ms"], g["unknown_ms"]) == (
            mine["active"], mine["idle_held"], mine["idle"], mine["unknown"]), g["uuid"]
    assert got_users(rep) == {k: v for k, v in users.items() if v[0] > 0}


@pytest.mark.parametrize("scenario", ["lab", "mig"])
def test_rollups_of_the_collector_match_raw(tmp_path, scenario):
    path = str(tmp_path / "half.db")
    collect(path, scenario, start="2024-01-01T07:30")  # 07:30..08:29:50: hour 7 gets rolled up
    a = report(path)
    b = report(path, "--no-rollups")
    assert a["source"]["rollup_hours"] == 1
    del a["source"], b["source"]
    assert a == b
    if scenario == "mig":
        assert a["data_quality"]["sm_unknown_ms"] > 0


def test_mig_read_back(tmp_path):
    path = str(tmp_path / "mig.db")
    collect(path, "mig")
    rep = report(path)
    mig = [g for g in rep["gpus"] if g["mig"]]
    phys = [g for g in rep["gpus"] if not g["mig"]]
    assert len(mig) == 2 and len(phys) == 2
    assert all(m["mig"]["parent_uuid"] in {p["uuid"] for p in phys} for m in mig)
    # MIG instances are not in the headline; their utilization is unknown, not 0
    assert rep["headline"]["total_ms"] == sum(p["total_ms"] for p in phys)
    assert all(m["unknown_ms"] == m["total_ms"] for m in mig)
    _, users = classify_here(path)
    assert got_users(rep) == {k: v for k, v in users.items() if v[0] > 0}
    # alice trains and bob idles on MIG instances: NVML gives no per-process SM
    # there, so their held time is SM unknown, never "not idle"
    by_user = {u["user"]: u for u in rep["identities"]["users"]}
    for name in ("alice", "bob"):
        u = by_user[name]
        assert u["held_ms"] > 0 and u["sm_unknown_ms"] == u["held_ms"] and u["idle_held_ms"] == 0
    dq = rep["data_quality"]
    assert dq["sm_unknown_users"] == 2
    assert dq["sm_unknown_ms"] == by_user["alice"]["held_ms"] + by_user["bob"]["held_ms"]
    assert dq["sm_recorded_since_ms"] is None


def cpu_split_here(path: str, A: int = A, H: int = H, C: int = 100) -> dict[str, tuple[int, int]]:  # noqa: N803
    """Per user: idle-held ms (waiting on CPU, CPU unknown), by SCHEMA.md's rule, by hand.

    Over the user's processes on the GPU that were still running at the end
    of the tick (kind & 4 clear): waiting when every cpu_permille is known and
    their sum >= C; unknown when one is NULL; else abandoned.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dur = dict(conn.execute("SELECT tick_id, duration_ms FROM tick"))
    per: dict[tuple[int, int, str], list[tuple]] = defaultdict(list)
    for tick_id, gpu_id, kind, mem, sm, cpu, user in conn.execute(
        "SELECT ps.tick_id, ps.gpu_id, ps.kind, ps.mem_mib, ps.sm_util, ps.cpu_permille, a.username "
        "FROM proc_sample ps JOIN process p USING (proc_id) JOIN account a USING (account_id) WHERE ps.kind & 1"
    ):
        per[(tick_id, gpu_id, user)].append((kind, mem, sm, cpu))
    conn.close()
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (tick_id, _, user), rows in per.items():
        held = any(m is None for _, m, _, _ in rows) or sum(m or 0 for _, m, _, _ in rows) * 1048576 > H
        idle = all(s is not None for _, _, s, _ in rows) and sum(s for _, _, s, _ in rows) * 10 < A
        if not (held and idle):
            continue
        running = [c for k, _, _, c in rows if not k & 4]
        if any(c is None for c in running):
            out[user][1] += dur[tick_id]
        elif sum(running) >= C:
            out[user][0] += dur[tick_id]
    return {u: (v[0], v[1]) for u, v in out.items()}


@pytest.mark.parametrize("active, held", [(A, H), (500, 1_000_000_000), (400, 0)])
def test_idle_held_splits_by_cpu_as_schema_rules_say(tmp_path, active, held):
    """Waiting on CPU, CPU unknown and abandoned per user, rollup hours (hourly or histograms) and raw."""
    path = str(tmp_path / "half.db")
    collect(path, "lab", start="2024-01-01T16:30")  # hour 16 rolled up; alice's job ends at 17:00, abandoned
    args = ("--active-threshold", f"{active / 10:g}", "--held-threshold", f"{held}B",
            "--since", "2024-01-01T16:00Z", "--until", "2024-01-01T18:00Z")  # the last --since counts
    rep = report(path, *args)
    assert rep["source"]["rollup_hours"] == 1
    assert rep["rules"]["cpu_busy_permille"] == 100 and "10 % of one core" in rep["rules"]["cpu_text"]
    mine = cpu_split_here(path, active, held)
    for u in rep["identities"]["users"]:
        busy, unknown = mine.get(u["user"], (0, 0))
        assert (u["idle_held_waiting_on_cpu_ms"], u["idle_held_cpu_unknown_ms"]) == (busy, unknown), u["user"]
        assert u["idle_held_abandoned_ms"] == u["idle_held_ms"] - busy - unknown >= 0
    users = {u["user"]: u for u in rep["identities"]["users"]}
    assert users["alice"]["idle_held_abandoned_ms"] > 0  # her finished job sits on its memory
    assert users["bob"]["idle_held_waiting_on_cpu_ms"] > 0  # his 2 GB notebook preprocesses at 25 %
    raw = report(path, *args, "--no-rollups")
    del rep["source"], raw["source"]
    assert rep == raw


def test_json_md_documents_every_field(lab):
    """Each key of the window report, of its objects and of an identity appears in JSON.md (before `now`)."""
    from pathlib import Path

    md = (Path(__file__).resolve().parent.parent / "reporter" / "JSON.md").read_text()
    md = md[:md.index("## `gua-report now`")]
    rep = report(lab)
    keys = set(rep)
    for name in ("database", "window", "filters", "rules", "headline", "idle_capacity", "heatmap", "energy",
                 "data_quality", "source"):
        keys |= set(rep[name])
    keys |= set(rep["identities"]) | set(rep["identities"]["users"][0]) | set(rep["identities"]["units"][0])
    keys |= set(rep["gpus"][0]) | set(rep["data_quality"]["runs"][0])
    missing = sorted(k for k in keys if f"`{k}`" not in md and f"`{k.rsplit('_', 2)[0]}_*" not in md)
    assert not missing, missing
