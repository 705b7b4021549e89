"""Per-process SM unknown, and processes that exited during a tick, on a hand-made database.

One hour from T0 (Monday 2024-01-01 00:00 UTC), 360 ticks of 10 s (the first
covers nothing), every GPU idle at the device level (util 0):
  g0  dave holds 8000 MiB; NVML cannot report per-process SM (NOT_SUPPORTED):
      sm NULL in every tick -> held 3590 s, all SM unknown: idle-held is "?"
  g1  erin holds 4000 MiB; sm NULL in the first 180 ticks, 0 after
      -> 1790 s SM unknown, 1800 s idle-held
  g2  frank holds 2000 MiB at sm 0, and a process of his that did 60 % SM
      work and exited during each tick (kind 1|4, 0 MiB) -> busy, not idle-held
  g3  grace's process exited during each tick (kind 1|4, 0 MiB, sm 30) and
      nothing else: she holds nothing, the card is truly idle
"""

from __future__ import annotations

import csv
import io

import pytest

from gua_collector import schema
from report_helpers import HOUR, T0, G, HandDb, P, report_json, run_report

pytestmark = pytest.mark.timeout(60)

WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-01T01:00Z", "--tz", "UTC")
EXITED = schema.KIND_COMPUTE | schema.KIND_EXITED
D = 10_000
HELD = 359 * D  # 360 ticks, the first with duration 0


def build(path: str, roll_up: bool) -> None:
    db = HandDb(path)
    g = [db.gpu(i) for i in range(4)]
    dave, erin, frank, grace = (db.account(n, 2001 + k) for k, n in enumerate(("dave", "erin", "frank", "grace")))
    pd = db.process(100, dave)
    pe = db.process(200, erin, unit="slurm:job_9")
    pf, pf_gone = db.process(300, frank), db.process(301, frank)
    pg_gone = db.process(400, grace)
    r = db.run(T0, stopped_ms=T0 + HOUR)
    for n in range(360):
        db.tick(r, T0 + n * D, D if n else 0,
                G(g[0], procs=(P(pd, mem=8000, sm=None),)),
                G(g[1], procs=(P(pe, mem=4000, sm=None if n < 180 else 0),)),
                G(g[2], procs=(P(pf, mem=2000, sm=0), P(pf_gone, kind=EXITED, mem=0, sm=60))),
                G(g[3], procs=(P(pg_gone, kind=EXITED, mem=0, sm=30),)))
    db.tick(r, T0 + HOUR, D)  # a tick of the next hour, as a running collector writes it
    if roll_up:
        db.roll_up(T0 // HOUR + 1)
    db.close()


@pytest.fixture(scope="module", params=[False, True], ids=["raw", "rolled"])
def db(request, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sm_rolled" if request.param else "sm_raw") / "gua.db")
    build(path, request.param)
    return path


def test_identities(db):
    rep = report_json(db, *WINDOW)
    users = {u["user"]: u for u in rep["identities"]["users"]}
    assert set(users) == {"dave", "erin", "frank"}  # grace's exited process held nothing
    dave, erin, frank = users["dave"], users["erin"], users["frank"]
    assert (dave["held_ms"], dave["idle_held_ms"], dave["sm_unknown_ms"]) == (HELD, 0, HELD)
    assert dave["sm_unknown"] is True and dave["sm_unknown_gpu_hours"] == round(HELD / HOUR, 4)
    assert (erin["held_ms"], erin["idle_held_ms"], erin["sm_unknown_ms"]) == (HELD, 180 * D, 179 * D)
    # the exited process's SM counts for frank (busy); its 0 MiB adds nothing
    assert (frank["held_ms"], frank["idle_held_ms"], frank["sm_unknown_ms"]) == (HELD, 0, 0)
    assert frank["mem_mib_ms"] == 2000 * HELD and frank["gpus"] == ["GPU-0000-0002"]
    assert [u["unit"] for u in rep["identities"]["units"]] == ["slurm:job_9"]
    assert rep["identities"]["units"][0]["sm_unknown_ms"] == 179 * D
    dq = rep["data_quality"]
    assert (dq["sm_unknown_ms"], dq["sm_unknown_users"]) == (HELD + 179 * D, 2)
    assert (dq["sm_recorded_since_ms"], dq["sm_unrecorded_ms"]) == (None, 0)


def test_exited_processes_hold_nothing(db):
    rep = report_json(db, *WINDOW)
    g = {x["index"]: x for x in rep["gpus"]}
    assert g[3]["idle_ms"] == HELD and g[3]["idle_held_ms"] == 0  # only an exited process: truly idle
    assert g[2]["idle_held_ms"] == HELD  # frank's live 2000 MiB holds the card
    assert g[0]["idle_held_ms"] == HELD  # the card-level split does not need per-process SM


def test_rollups_equal_raw(db):
    a, b = report_json(db, *WINDOW), report_json(db, *WINDOW, "--no-rollups")
    assert a["source"]["rollup_hours"] == (1 if "sm_rolled" in db else 0)
    del a["source"], b["source"]
    assert a == b


def test_text_never_shows_0_idle_held_for_unknown(db):
    r = run_report("--db", db, *WINDOW)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    head = next(line for line in lines if line.lstrip().startswith("user "))
    assert head.split() == ["user", "GPU-h", "held", "idle-held", "idle", "%", "SM", "?", "GB-h", "mem", "GPUs"]
    table = lines[:next(n for n, line in enumerate(lines) if "Idle-held by CPU" in line)]  # not the CPU split
    row = {line.split()[0]: line.split()[1:] for line in table if line[:8].strip() in ("dave", "erin", "frank")}
    assert row["dave"][:4] == ["1.00", "?", "?", "100%"]  # never "0.00 0%"
    assert row["erin"][:4] == ["1.00", "0.50", "50%", "50%"]
    assert row["frank"][:4] == ["1.00", "0.00", "0%", "-"]
    assert "grace" not in r.stdout
    assert "per-process SM unknown: 1.49 GPU-h held by 2 users (MIG, unsupported);" in r.stdout
    assert "their idle-held is a lower bound" in r.stdout
    # the columns line up with the header
    assert head.index("SM ?") == lines[lines.index(head) + 1].index("100%")
    assert head.index("idle-held") + 8 == lines[lines.index(head) + 2].index("0.50") + 3


def test_csv(db):
    r = run_report("--db", db, *WINDOW, "--format", "csv")
    got = {(s, subj, m): v for s, subj, m, v in list(csv.reader(io.StringIO(r.stdout)))[1:]}
    assert got[("user", "dave", "sm_unknown_ms")] == str(HELD)
    assert got[("unit", "erin/slurm:job_9", "sm_unknown_gpu_hours")] == str(round(179 * D / HOUR, 4))
    assert got[("data_quality", "", "sm_unknown_users")] == "2"
