"""gua-report arithmetic on a hand-made database, every section checked by hand.

Timeline (T0 = Monday 2024-01-01 00:00 UTC), every GPU sampled every tick:
  run 1  T0         first tick, d = 0 (covers nothing)
         T0+10..60 s   six 10 s ticks            (phase A, 60 s)
         T0+120..300 s four 60 s ticks           (phase B, 240 s)  mixed interval
         then killed: no stopped_ms              (unclean stop)
  gap    T0+300..1200 s, also a 'gap' event
  run 2  T0+1200 s   first tick, d = 0; T0+1210..1230 s three 10 s ticks (30 s);
         stopped cleanly at T0+1235 s
Per GPU: 60 + 240 + 30 = 330 s, 15 rows.

GPUs and what they do:
  g0  active card: util 50 % (A), 5 % (B), 80 % (run 2); alice 2000 MiB (sm 50/5/80)
      and bob 4000 MiB at sm 0 -- an idle notebook hidden on a busy card; energy 300 mJ/ms
  g1  bob's notebook: two processes 300 + 500 MiB at 0 % (counted once), the 500 MiB one
      in slurm:job_7; carol 50 MiB (below the threshold: not held by carol); coverage
      500 permille in phase B
  g2  Xorg only (graphics, 45 MiB): truly idle; one NVML error row at T0+60 s
  g3  carol with memory NVML cannot report (NULL): held and flagged
  g4  idle in run 1, lost (status 2) in run 2
  g5  MIG parent (util not supported) with MIG instance g6 (slot 0): carol 5000 MiB, sm NULL
      (held, SM unknown: neither idle-held nor busy)
"""

from __future__ import annotations

import pytest

from report_helpers import HOUR, T0, G, HandDb, P, report_json, run_report

pytestmark = pytest.mark.timeout(60)

S = 1000
UNTIL = "2024-01-01T01:00:00Z"
SINCE = "2024-01-01T00:00:00Z"


def build(path: str, roll_up: bool = False) -> None:
    db = HandDb(path)
    g = [db.gpu(i) for i in range(6)]
    g6 = db.gpu(5, uuid="MIG-0000-0005-0", name="NVIDIA A100 3g.40gb", parent=g[5], slot=0)
    db.conn.execute("UPDATE gpu SET name = 'NVIDIA A100-SXM4-80GB' WHERE gpu_id = ?", (g[5],))
    alice, bob, carol, root = (db.account(n, u) for n, u in
                               (("alice", 1001), ("bob", 1002), ("carol", 1003), ("root", 0)))
    pa = db.process(100, alice)
    pb1 = db.process(200, bob, comm="jupyter")
    pb2 = db.process(201, bob)
    pb3 = db.process(202, bob, unit="slurm:job_7")
    pc0 = db.process(300, carol)
    pc1 = db.process(301, carol)
    pc2 = db.process(302, carol)
    px = db.process(1500, root, comm="Xorg", unit="unit:display-manager.service")

    def gpus(util0: int, sm_alice: int, cov1: int, g4_status: int, d: int, g2_status: int = 0) -> list[G]:
        return [
            G(g[0], util=util0, energy=300 * d,
              procs=(P(pa, mem=2000, sm=sm_alice), P(pb1, mem=4000, sm=0))),
            G(g[1], util=0, cov=cov1,
              procs=(P(pb2, mem=300), P(pb3, mem=500), P(pc0, mem=50))),
            G(g[2], util=0, status=g2_status, procs=(P(px, kind=2, mem=45, sm=None),)),
            G(g[3], util=0, procs=(P(pc1, mem=None, sm=0),)),
            G(g[4], util=0, status=g4_status),
            G(g[5], util=None),
            G(g6, util=None, procs=(P(pc2, mem=5000, sm=None),)),
        ]

    r1 = db.run(T0)
    db.tick(r1, T0, 0, *gpus(500, 50, 1000, 0, 0))
    for n in range(1, 7):
        d = 10 * S
        db.tick(r1, T0 + n * d, d, *gpus(500, 50, 1000, 0, d, g2_status=1 if n == 6 else 0))
    for n in range(1, 5):
        d = 60 * S
        db.tick(r1, T0 + 60 * S + n * d, d, *gpus(50, 5, 500, 0, d))
    db.event(T0 + 60 * S, "nvml_error", r1, gpu_id=g[2], detail="NVML_ERROR_UNKNOWN")
    db.event(T0 + 300 * S, "gap", None, end_ms=T0 + 1200 * S, detail="collector down")
    r2 = db.run(T0 + 1200 * S, stopped_ms=T0 + 1235 * S)
    db.tick(r2, T0 + 1200 * S, 0, *gpus(800, 80, 1000, 2, 0))
    for n in range(1, 4):
        d = 10 * S
        db.tick(r2, T0 + 1200 * S + n * d, d, *gpus(800, 80, 1000, 2, d))
    db.event(T0 + 1200 * S, "gpu_lost", r2, gpu_id=g[4], detail="NVML_ERROR_GPU_IS_LOST")
    if roll_up:
        db.roll_up(T0 // HOUR + 1)
    db.close()


@pytest.fixture(scope="module")
def hand_db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("arith") / "hand.db")
    build(path)
    return path


@pytest.fixture(scope="module")
def rep(hand_db) -> dict:
    return report_json(hand_db, "--since", SINCE, "--until", UNTIL)


def by_index(rep: dict) -> dict:
    return {(g["index"], g["mig"]["slot"] if g["mig"] else None): g for g in rep["gpus"]}


def test_headline(rep):
    h = rep["headline"]
    assert rep["format_version"] == 2
    assert h["ticks"] == 6 * 15  # physical GPUs only; the MIG instance is not in the headline
    assert h["total_ms"] == 6 * 330_000
    assert h["active_ms"] == 90_000
    assert h["idle_held_ms"] == 240_000 + 330_000 + 330_000
    assert h["idle_ms"] == 320_000 + 300_000
    assert h["unknown_ms"] == 10_000 + 30_000 + 330_000
    known = 1_610_000
    assert h["known_ms"] == known
    assert h["active_share"] == round(90_000 / known, 6)
    assert h["idle_held_share"] == round(900_000 / known, 6)
    assert h["idle_share"] == round(620_000 / known, 6)


def test_idle_capacity(rep):
    c = rep["idle_capacity"]
    assert c["window_hours"] == 1.0
    assert c["idle_held_gpu_hours"] == round(900_000 / HOUR, 4)
    assert c["idle_gpu_hours"] == round(620_000 / HOUR, 4)
    assert c["idle_held_equivalent_gpus"] == 0.25
    assert c["idle_equivalent_gpus"] == round(620_000 / HOUR, 4)


def test_per_gpu(rep):
    g = by_index(rep)
    assert len(g) == 7
    g0 = g[(0, None)]
    assert (g0["active_ms"], g0["idle_held_ms"], g0["idle_ms"], g0["unknown_ms"]) == (90_000, 240_000, 0, 0)
    assert g0["ticks"] == 15 and g0["total_ms"] == 330_000
    g1 = g[(1, None)]
    assert g1["idle_held_ms"] == 330_000
    assert g1["utilization_coverage"] == round((60_000 * 1000 + 240_000 * 500 + 30_000 * 1000) / 330_000_000, 6)
    g2 = g[(2, None)]  # Xorg only: truly idle, not held
    assert (g2["idle_ms"], g2["idle_held_ms"], g2["unknown_ms"]) == (320_000, 0, 10_000)
    assert g2["errors"] == [{"kind": "nvml_error", "count": 1, "first_ms": T0 + 60_000,
                             "last_ms": T0 + 60_000, "last_detail": "NVML_ERROR_UNKNOWN"}]
    g3 = g[(3, None)]  # NULL memory: held
    assert g3["idle_held_ms"] == 330_000
    g4 = g[(4, None)]
    assert (g4["idle_ms"], g4["unknown_ms"]) == (300_000, 30_000)
    assert g4["last_status"] == "lost"
    assert [e["kind"] for e in g4["errors"]] == ["gpu_lost"]
    g5 = g[(5, None)]
    assert g5["unknown_ms"] == 330_000 and g5["mig"] is None
    mig = g[(5, 0)]
    assert mig["mig"] == {"parent_uuid": "GPU-0000-0005", "parent_index": 5, "slot": 0}
    assert mig["unknown_ms"] == 330_000
    assert mig["name"] == "NVIDIA A100 3g.40gb"


def test_identities(rep):
    users = rep["identities"]["users"]
    assert [u["user"] for u in users] == ["bob", "carol", "alice"]  # root's Xorg never holds
    bob, carol, alice = users
    # bob: hidden idle notebook on g0 (card active) + two processes on g1 counted once
    assert bob["held_ms"] == 660_000
    assert bob["idle_held_ms"] == 660_000
    assert bob["mem_mib_ms"] == 4000 * 330_000 + 800 * 330_000
    assert bob["unknown_mem_ms"] == 0 and bob["memory_unknown"] is False
    assert bob["sm_unknown_ms"] == 0 and bob["sm_unknown"] is False
    assert bob["gpus"] == ["GPU-0000-0000", "GPU-0000-0001"]
    assert bob["uid"] == 1002
    # carol: NULL memory on g3 (held, flagged), MIG instance (sm unknown: neither idle-held
    # nor busy); her 50 MiB on g1 is below the threshold
    assert carol["held_ms"] == 660_000
    assert carol["idle_held_ms"] == 330_000
    assert carol["sm_unknown_ms"] == 330_000 and carol["sm_unknown"] is True
    assert carol["sm_unknown_gpu_hours"] == round(330_000 / HOUR, 4)
    assert carol["sm_unrecorded_ms"] == 0
    assert carol["mem_mib_ms"] == 5000 * 330_000
    assert carol["unknown_mem_ms"] == 330_000 and carol["memory_unknown"] is True
    assert "GPU-0000-0001" not in carol["gpus"]
    assert alice["held_ms"] == 330_000
    assert alice["idle_held_ms"] == 240_000
    assert alice["mem_mib_ms"] == 2000 * 330_000
    assert alice["mem_gb_hours"] == round(2000 * 330_000 * 1_048_576 / 1e9 / HOUR, 4)
    units = rep["identities"]["units"]
    assert units == [{
        "user": "bob", "uid": 1002, "unit": "slurm:job_7", "held_ms": 330_000,
        "idle_held_ms": 330_000, "mem_mib_ms": 500 * 330_000, "unknown_mem_ms": 0,
        "sm_unknown_ms": 0, "sm_unrecorded_ms": 0,
        # the hand-made rows have no CPU: all of its idle-held time is CPU unknown (test_cpu_split)
        "idle_held_abandoned_ms": 0, "idle_held_waiting_on_cpu_ms": 0, "idle_held_cpu_unknown_ms": 330_000,
        "held_gpu_hours": round(330_000 / HOUR, 4), "idle_held_gpu_hours": round(330_000 / HOUR, 4),
        "sm_unknown_gpu_hours": 0.0, "idle_held_abandoned_gpu_hours": 0.0, "idle_held_waiting_on_cpu_gpu_hours": 0.0,
        "mem_gb_hours": round(500 * 330_000 * 1_048_576 / 1e9 / HOUR, 4), "memory_unknown": False,
        "sm_unknown": False,
        # no GPM on the hand-made rows: no busy time where it was known, starved unknown (not 0)
        "gpm_busy_ms": 0, "starved_ms": None, "starved_gpu_hours": None,
        "gpus": ["GPU-0000-0001"],
    }]


def test_heatmap_utc(rep):
    hm = rep["heatmap"]
    assert hm["known_ms"][0][0] == 1_610_000 and hm["active_ms"][0][0] == 90_000
    assert hm["active_share"][0][0] == round(90_000 / 1_610_000, 6)
    filled = [(d, h) for d in range(7) for h in range(24) if hm["active_share"][d][h] is not None]
    assert filled == [(0, 0)]


@pytest.mark.parametrize("tz,cell", [("Europe/Berlin", (0, 1)), ("Asia/Kolkata", (0, 5)),
                                     ("America/New_York", (6, 19))])
def test_heatmap_tz(hand_db, tz, cell):
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--tz", tz)
    hm = rep["heatmap"]
    filled = [(d, h) for d in range(7) for h in range(24) if hm["known_ms"][d][h]]
    assert filled == [cell]  # New York: Sunday 19:00
    assert rep["window"]["tz"] == tz


def test_energy(rep):
    e = rep["energy"]
    assert (e["gpus_reporting"], e["gpus_total"]) == (1, 6)
    assert e["active_mj"] == 300 * 90_000
    assert e["idle_held_mj"] == 300 * 240_000
    assert e["idle_mj"] is None
    assert e["active_kwh"] == round(300 * 90_000 / 3.6e9, 6)


def test_data_quality(rep):
    q = rep["data_quality"]
    assert q["utilization_coverage"] == round(
        (330_000 * 1000 + (60_000 * 1000 + 240_000 * 500 + 30_000 * 1000) + 320_000 * 1000
         + 330_000 * 1000 + 300_000 * 1000) / (1000 * 1_610_000), 6)
    assert q["unknown_ms"] == 370_000
    assert (q["sm_unknown_ms"], q["sm_unknown_users"]) == (330_000, 1)  # carol on the MIG instance
    assert (q["sm_recorded_since_ms"], q["sm_unrecorded_ms"]) == (None, 0)  # a schema 2 database
    assert q["gap_events"] == [{"start_ms": T0 + 300_000, "end_ms": T0 + 1_200_000, "run_id": None,
                                "detail": "collector down"}]
    assert q["holes"] == [
        {"start_ms": T0 + 300_000, "end_ms": T0 + 1_200_000, "open_ended": False},
        {"start_ms": T0 + 1_230_000, "end_ms": T0 + HOUR, "open_ended": True},
    ]
    runs = {r["run_id"]: r for r in q["runs"]}
    assert runs[1]["clean"] is False and runs[1]["last_tick_ms"] == T0 + 300_000
    assert runs[2]["clean"] is True
    assert q["unclean_stops"] == 1
    assert rep["window"]["first_sample_ms"] == T0
    assert rep["window"]["last_sample_ms"] == T0 + 1_230_000


def test_rollups_match_raw(tmp_path):
    path = str(tmp_path / "rolled.db")
    build(path, roll_up=True)
    a = report_json(path, "--since", SINCE, "--until", UNTIL)
    b = report_json(path, "--since", SINCE, "--until", UNTIL, "--no-rollups")
    assert a["source"]["rollup_hours"] == 1 and b["source"]["rollup_hours"] == 0
    for d in (a, b):
        del d["source"]
        d["database"]["path"] = ""
    assert a == b
    # and both equal the unrolled database's numbers
    c = report_json(str(tmp_path / "rolled.db"), "--since", SINCE, "--until", UNTIL, "--no-rollups")
    del c["source"]
    c["database"]["path"] = ""
    assert c == a


def test_thresholds(hand_db):
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--active-threshold", "4",
                      "--held-threshold", "1GB")
    g = by_index(rep)
    assert g[(0, None)]["active_ms"] == 330_000  # 5 % now counts as active
    assert g[(1, None)]["idle_ms"] == 330_000  # 800 MiB < 1 GB: not held
    assert rep["rules"]["active_threshold_permille"] == 40
    assert rep["rules"]["held_threshold_bytes"] == 10**9
    bob = next(u for u in rep["identities"]["users"] if u["user"] == "bob")
    assert bob["held_ms"] == 330_000  # only the 4000 MiB notebook
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--held-threshold", "400MiB")
    assert rep["rules"]["held_threshold_bytes"] == 400 * 1_048_576
    assert by_index(rep)[(1, None)]["idle_held_ms"] == 330_000  # 800 MiB > 400 MiB


def test_gpu_and_user_filters(hand_db):
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--gpu", "1", "--gpu", "GPU-0000-0003")
    assert [g["index"] for g in rep["gpus"]] == [1, 3]
    assert rep["headline"]["total_ms"] == 660_000
    assert {u["user"] for u in rep["identities"]["users"]} == {"bob", "carol"}
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--gpu", "5")
    assert len(rep["gpus"]) == 2  # the MIG instance comes with its parent
    rep = report_json(hand_db, "--since", SINCE, "--until", UNTIL, "--user", "alice", "--user", "1003")
    assert [u["user"] for u in rep["identities"]["users"]] == ["carol", "alice"]
    assert rep["headline"]["total_ms"] == 6 * 330_000  # GPU sections are not filtered by user


def test_window_edges_partial(hand_db):
    # [T0+60 s, T0+1210 s): ticks at 60 s (10 s), 120..300 s, 1200 s (d=0); not 1210 s.
    rep = report_json(hand_db, "--since", "2024-01-01T00:01:00Z", "--until", "2024-01-01T00:20:10Z")
    g0 = by_index(rep)[(0, None)]
    assert g0["ticks"] == 1 + 4 + 1
    assert g0["total_ms"] == 10_000 + 240_000
    assert g0["active_ms"] == 10_000


def test_text_report(hand_db):
    r = run_report("--db", hand_db, "--since", SINCE, "--until", UNTIL, "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in out.splitlines():
        assert len(line) <= 80, line
    assert "\x1b[" not in out  # not a TTY: no colour
    for title in ("GPU TIME", "IDLE CAPACITY", "PER GPU", "TOP IDENTITIES", "ACTIVE SHARE BY WEEKDAY",
                  "ENERGY", "DATA QUALITY"):
        assert title in out
    assert "active   5.6%" in out and "idle-held  55.9%" in out and "truly idle  38.5%" in out
    assert "90 GPU-ticks" in out
    assert "0.25 GPUs on average" in out
    assert "truly idle -" in out  # no idle row had energy
    assert "slurm:job_7 (bob)" in out
    assert "MIG of 5" in out and "LOST since 01-01 00:20" in out
    assert "1 of 6 GPUs reported energy" in out
    assert "1 unclean stop" in out
    assert "collector down" in out
    # carol's MIG half: an SM ? column and a data-quality line
    carol = next(line for line in out.splitlines() if line.startswith("  carol "))
    assert carol.split()[1:5] == ["0.18", "0.09", "50%", "50%"], carol
    assert "per-process SM unknown: 0.09 GPU-h held by 1 user" in out


def test_csv_report(hand_db):
    import csv
    import io

    r = run_report("--db", hand_db, "--since", SINCE, "--until", UNTIL, "--tz", "UTC", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["section", "subject", "metric", "value"]
    got = {(s, subj, m): v for s, subj, m, v in rows[1:]}
    assert got[("report", "", "format_version")] == "2"
    assert got[("headline", "", "active_ms")] == "90000"
    assert got[("user", "bob", "held_ms")] == "660000"
    assert got[("user", "carol", "sm_unknown_ms")] == "330000"
    assert got[("user", "carol", "sm_unknown")] == "true"
    assert got[("data_quality", "", "sm_unknown_users")] == "1"
    assert got[("data_quality", "", "sm_recorded_since_ms")] == ""
    assert got[("unit", "bob/slurm:job_7", "held_ms")] == "330000"
    assert got[("gpu", "GPU-0000-0004", "last_status")] == "lost"
    assert got[("heatmap", "Mon 00", "active_ms")] == "90000"
    assert got[("run", "1", "clean")] == "false"


def test_days_old_window_is_empty(hand_db):
    r = run_report("--db", hand_db, "--since", "2024-02-01", "--until", "2024-02-02", "--tz", "UTC")
    assert r.returncode == 8
    assert "no samples between 2024-02-01 00:00 and 2024-02-02 00:00" in r.stderr


def test_cpu_split(tmp_path):
    """Idle-held time by the holder's CPU, by hand: every case of the rule, both paths, three formats.

    One hour and 6 minutes of 60 s ticks, each GPU held by one account at 0 % SM (idle-held):
      g0 alice, one process at 150 permille (15 % of one core): waiting on CPU
      g1 bob, two processes at 60 + 60 permille: together 12 %, waiting on CPU
      g2 carol at 50 permille: abandoned; a second process that left during the tick
         (kind 1|4, no CPU) changes nothing
      g3 dave, one process at 200, one whose CPU was not measured: CPU unknown
    """
    path = str(tmp_path / "cpu.db")
    db = HandDb(path)
    gpus = [db.gpu(i) for i in range(4)]
    acc = {n: db.account(n, 1000 + i) for i, n in enumerate(("alice", "bob", "carol", "dave"))}
    proc = {k: db.process(100 + i, acc[k[0]]) for i, k in enumerate(
        [("alice", 1), ("bob", 1), ("bob", 2), ("carol", 1), ("carol", 2), ("dave", 1), ("dave", 2)])}
    r = db.run(T0)
    rows = (
        G(gpus[0], procs=(P(proc[("alice", 1)], cpu=150),)),
        G(gpus[1], procs=(P(proc[("bob", 1)], cpu=60), P(proc[("bob", 2)], cpu=60))),
        G(gpus[2], procs=(P(proc[("carol", 1)], cpu=50), P(proc[("carol", 2)], kind=5, mem=0, cpu=None))),
        G(gpus[3], procs=(P(proc[("dave", 1)], cpu=200), P(proc[("dave", 2)], cpu=None))),
    )
    db.ticks(r, T0, 66, 60_000, *rows)
    db.roll_up(T0 // HOUR + 1)
    db.close()
    window = ("--since", SINCE, "--until", "2024-01-01T01:07:00Z")  # the last tick ends at 01:06
    rep = report_json(path, *window)
    assert rep["source"]["rollup_hours"] == 1
    held = 66 * 60_000
    want = {"alice": (0, held, 0), "bob": (0, held, 0), "carol": (held, 0, 0), "dave": (0, 0, held)}
    got = {u["user"]: (u["idle_held_abandoned_ms"], u["idle_held_waiting_on_cpu_ms"], u["idle_held_cpu_unknown_ms"])
           for u in rep["identities"]["users"]}
    assert got == want
    assert rep["rules"]["cpu_busy_permille"] == 100
    for args in ((), ("--held-threshold", "1GB")):  # hourly rollups and histograms
        a, b = report_json(path, *window, *args), report_json(path, *window, *args, "--no-rollups")
        del a["source"], b["source"]
        assert a == b
    text = run_report("--db", path, *window, "--tz", "UTC").stdout
    block = text[text.index("Idle-held by CPU"):text.index("ACTIVE SHARE")]
    assert ">= 10 % of one core together in the tick" in " ".join(block.split())
    lines = {line.split()[0]: line.split()[1:] for line in block.splitlines()[3:] if line.strip()}
    assert lines["carol"] == ["1.10", "1.10", "0.00", "0.00"]
    assert lines["alice"] == lines["bob"] == ["1.10", "0.00", "1.10", "0.00"]
    assert lines["dave"] == ["1.10", "0.00", "0.00", "1.10"]
    assert all(len(line) <= 80 for line in text.splitlines())
    csv_text = run_report("--db", path, *window, "--tz", "UTC", "--format", "csv").stdout
    assert f"user,carol,idle_held_abandoned_ms,{held}" in csv_text
    assert f"user,alice,idle_held_waiting_on_cpu_ms,{held}" in csv_text
