"""gua-report never writes: bytes, mtime and directory listing stay as they were,
it reads while the collector writes (WAL), and a reader in the DB's group who
cannot write the directory can report, both during and after a collector run."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import shutil

import pytest

from report_helpers import HOUR, T0, G, HandDb, P, run_report, sim_ticks

pytestmark = pytest.mark.timeout(60)

WINDOW = ("--since", "2024-01-01T00:00Z", "--until", "2024-01-02T00:00Z", "--tz", "UTC", "--format", "json")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")


def snapshot(directory: str) -> dict[str, tuple[str, int]]:
    out = {}
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        with open(p, "rb") as f:
            out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def hand_db(path: str) -> None:
    db = HandDb(path)
    g0 = db.gpu(0)
    a = db.account("alice", 1001)
    p = db.process(100, a)
    r = db.run(T0, stopped_ms=T0 + 400_000)
    db.ticks(r, T0, 30, 10_000, G(g0, util=500, procs=(P(p, mem=2000, sm=50),)), first_duration=0)
    db.close()


def test_report_changes_nothing(tmp_path):
    path = str(tmp_path / "gua.db")
    hand_db(path)
    before = snapshot(str(tmp_path))
    for fmt in ("text", "json", "csv"):
        r = run_report("--db", path, *WINDOW[:-2], "--format", fmt)
        assert r.returncode == 0, r.stderr
    r = run_report("--db", path, *WINDOW, "--no-rollups")
    assert r.returncode == 0, r.stderr
    assert snapshot(str(tmp_path)) == before  # no -wal, -shm or journal appeared; bytes and mtime same


def test_store_db_after_clean_exit(tmp_path):
    """The collector's Store leaves no -wal behind; the reporter opens immutable and adds none."""
    from gua_collector.store import Store

    path = str(tmp_path / "gua.db")
    store = Store.open(path, now_ms=T0)
    store.begin_run(T0, 10_000, "simulate:lab", "gpu01", "test")
    store.write_ticks(list(sim_ticks(T0, T0 + HOUR + 600_000, 10_000, "lab")))
    store.end_run(T0 + HOUR + 600_000)
    store.close()
    assert not os.path.exists(path + "-wal")
    before = snapshot(str(tmp_path))
    rep = json.loads(run_report("--db", path, *WINDOW).stdout)
    assert rep["headline"]["ticks"] == 4 * (360 + 60)
    assert snapshot(str(tmp_path)) == before


def test_reads_while_collector_writes(tmp_path):
    """A writer in WAL mode with an open write transaction: the report sees the committed snapshot."""
    from gua_collector.store import Store

    path = str(tmp_path / "gua.db")
    store = Store.open(path, now_ms=T0)
    try:
        store.begin_run(T0, 10_000, "simulate:lab", "gpu01", "test")
        ticks = list(sim_ticks(T0, T0 + 2 * HOUR, 10_000, "lab"))
        store.write_ticks(ticks[:360])
        assert os.path.exists(path + "-wal")
        rep = json.loads(run_report("--db", path, *WINDOW).stdout)
        assert rep["headline"]["ticks"] == 4 * 360
        # hold the write lock with uncommitted rows, as the collector does mid-tick
        store._conn.execute("BEGIN IMMEDIATE")
        for t in ticks[360:400]:
            store._write_tick(t)
        r = run_report("--db", path, *WINDOW)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["headline"]["ticks"] == 4 * 360  # uncommitted rows invisible
        store._conn.execute("COMMIT")
        store.write_ticks(ticks[400:])
        rep = json.loads(run_report("--db", path, *WINDOW).stdout)
        assert rep["headline"]["ticks"] == 4 * 720
        assert rep["source"]["rollup_hours"] == 1  # hour 0 rolled up by the collector; hour 1 raw
        raw = json.loads(run_report("--db", path, *WINDOW, "--no-rollups").stdout)
        for d in (rep, raw):
            del d["source"]
        assert rep == raw
    finally:
        store.close()


def _reader_group() -> grp.struct_group | None:
    for name in ("users", "staff", "adm"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    return None


def _as_group_member(gid: int) -> list[str]:
    """nobody, with `gid` as a supplementary group only: like an admin in group gua."""
    return ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--groups", str(gid)]


@needs_root
def test_group_member_reads_without_directory_write(shared_dir):
    """0750 dir and 0640 files owned by root:GROUP; the reader is nobody + GROUP.

    After a clean collector exit (no -wal) and while a writer holds the DB in
    WAL mode (-wal and -shm exist, 0640), the report works and writes nothing.
    """
    from gua_collector.store import Store

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    group = _reader_group()
    if group is None:
        pytest.skip("no spare system group (users/staff/adm) to act as the gua group")
    state = os.path.join(shared_dir, "gua")
    os.mkdir(state)
    os.chown(state, 0, group.gr_gid)
    os.chmod(state, 0o750)
    path = os.path.join(state, "gua.db")
    ticks = list(sim_ticks(T0, T0 + 2 * HOUR, 10_000, "lab"))
    store = Store.open(path, now_ms=T0)
    os.chown(path, 0, group.gr_gid)
    store.begin_run(T0, 10_000, "simulate:lab", "gpu01", "test")
    store.write_ticks(ticks[:360])
    for side in ("-wal", "-shm"):
        os.chown(path + side, 0, group.gr_gid)
        os.chmod(path + side, 0o640)
    as_reader = _as_group_member(group.gr_gid)
    try:
        before = sorted(os.listdir(state))
        r = run_report("--db", path, *WINDOW, user=as_reader)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["headline"]["ticks"] == 4 * 360
        store.write_ticks(ticks[360:])
        r = run_report("--db", path, *WINDOW, user=as_reader)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["headline"]["ticks"] == 4 * 720
        assert sorted(os.listdir(state)) == before
    finally:
        store.end_run(T0 + 2 * HOUR)
        store.close()
    assert not os.path.exists(path + "-wal")  # clean exit: SQLite removed -wal and -shm
    before = snapshot(state)
    r = run_report("--db", path, *WINDOW, user=as_reader)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["headline"]["ticks"] == 4 * 720
    assert snapshot(state) == before
    # and someone outside the group is told which group to join
    r = run_report("--db", path, *WINDOW,
                   user=["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
    assert r.returncode == 4
    assert f"join the '{group.gr_name}' group" in r.stderr


def test_stale_wal_without_shm(tmp_path):
    """A killed collector's -wal without -shm: read the main file, create nothing, warn."""
    from gua_collector.store import Store

    live = tmp_path / "live"
    live.mkdir()
    path = str(live / "gua.db")
    ticks = list(sim_ticks(T0, T0 + 2 * HOUR, 10_000, "lab"))
    store = Store.open(path, now_ms=T0)
    try:
        store.begin_run(T0, 10_000, "simulate:lab", "gpu01", "test")
        store.write_ticks(ticks[:360])
        early = tmp_path / "early"  # everything still in the WAL
        early.mkdir()
        shutil.copy(path, early / "gua.db")
        shutil.copy(path + "-wal", early / "gua.db-wal")
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.write_ticks(ticks[360:])
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        shutil.copy(path, crashed / "gua.db")
        shutil.copy(path + "-wal", crashed / "gua.db-wal")
    finally:
        store.close()
    before = snapshot(str(crashed))
    r = run_report("--db", str(crashed / "gua.db"), *WINDOW)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["headline"]["ticks"] == 4 * 360  # the checkpointed part
    assert "-wal file without its -shm" in rep["data_quality"]["warnings"][0]
    assert snapshot(str(crashed)) == before
    before = snapshot(str(early))
    r = run_report("--db", str(early / "gua.db"), *WINDOW)
    assert r.returncode == 3, r.stderr
    assert "start gua-collector again" in r.stderr
    assert snapshot(str(early)) == before
