"""`gua-report merge`: one fleet report from several hosts' JSON documents.

The host documents are made by the real gua-report from hand-made
databases (so the fleet numbers can be checked against each host's own),
then edited where a test needs a document no honest host would send: the
documents come from other machines and are untrusted.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from gua_report import merge as merge_mod
from gua_report.merge import EXIT_BAD_DOCUMENT, EXIT_NO_HOST, FLEET_FORMAT_VERSION
from report_helpers import HOUR, T0, G, HandDb, P, run_report

pytestmark = pytest.mark.timeout(120)

SINCE, UNTIL = "2024-01-01T00:00Z", "2024-01-01T01:00Z"
WINDOW = ("--since", SINCE, "--until", UNTIL, "--tz", "UTC")
TICK = 10_000
N_TICKS = 359  # ticks end at T0+10 s .. T0+3590 s: all inside the hour

# Which user holds which GPU how, per host: (host, [(gpu util permille, [(user, uid, MiB, SM %)])]).
# alice is on all three hosts (one fleet line), idle-held everywhere; bob is
# busy on gpu01 and idle on gpu02's busy card (his own idle-held); carol only on gpu03.
HOSTS = {
    "gpu01": [(0, [("alice", 1001, 2000, 0)]), (500, [("bob", 1002, 3000, 50)])],
    "gpu02": [(0, [("alice", 1001, 4000, 0)]), (600, [("carol", 1003, 1000, 60), ("bob", 1002, 500, 0)])],
    "gpu03": [(0, [("alice", 2001, 1000, 0)]), (0, []), (0, [("carol", 1003, 8000, 0)])],
}


def build_host_db(path: str, host: str, gpus=None, ticks: int = N_TICKS, hostname: str | None = None) -> str:
    """One host's database: GPUs and holders from HOSTS, `ticks` equal 10 s ticks from T0."""
    db = HandDb(path)
    accounts: dict[str, int] = {}
    rows = []
    for n, (util, holders) in enumerate(HOSTS[host] if gpus is None else gpus):
        gid = db.gpu(n, uuid=f"GPU-{host}-{n}")
        procs = []
        for pid, (user, uid, mib, sm) in enumerate(holders, 100 * (n + 1)):
            if user not in accounts:
                accounts[user] = db.account(user, uid)
            procs.append(P(db.process(pid, accounts[user]), mem=mib, sm=sm))
        rows.append(G(gid, util=util, procs=tuple(procs)))
    db.ticks(db.run(T0, hostname=hostname or host), T0, ticks, TICK, *rows)
    db.close()
    return path


def host_json(db: str, *extra: str) -> dict:
    r = run_report("--db", db, "--format", "json", *WINDOW, *extra)
    assert r.returncode in (0, 8), r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, dict]:
    """Each host's `gua-report --format json` document for the hour."""
    d = tmp_path_factory.mktemp("hosts")
    return {h: host_json(build_host_db(str(d / f"{h}.db"), h)) for h in HOSTS}


def write_docs(tmp_path: Path, *docs: dict | str | bytes) -> list[str]:
    paths = []
    for n, doc in enumerate(docs):
        p = tmp_path / f"host{n}.json"
        if isinstance(doc, bytes):
            p.write_bytes(doc)
        else:
            p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        paths.append(str(p))
    return paths


def merge_run(capsys, *argv: str) -> tuple[int, str, str]:
    """`gua-report merge ARGV` in this process (fast); (exit code, stdout, stderr)."""
    try:
        code = merge_mod.run(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def fleet_json(capsys, *paths: str) -> dict:
    code, out, err = merge_run(capsys, "--format", "json", *paths)
    assert code in (0, EXIT_NO_HOST), err
    return json.loads(out)


def _inert(text: str) -> None:
    """Printable ASCII and newlines only: no control, bidi or invisible character."""
    for ch in text:
        assert ch == "\n" or " " <= ch <= "~", (repr(ch), unicodedata.name(ch, "?"))


# ---------------------------------------------------------------- the fleet's numbers

def test_fleet_totals_are_the_sum_of_the_hosts(docs, tmp_path, capsys):
    f = fleet_json(capsys, *write_docs(tmp_path, *docs.values()))
    assert f["format_version"] == FLEET_FORMAT_VERSION and f["command"] == "merge"
    fl = f["fleet"]
    assert (fl["hosts_total"], fl["hosts_merged"], fl["gpus"]) == (3, 3, 7)
    for key in ("ticks", "total_ms", "active_ms", "idle_held_ms", "idle_ms", "unknown_ms", "known_ms"):
        assert fl[key] == sum(d["headline"][key] for d in docs.values()), key
    # By hand: 7 GPUs x 359 ticks x 10 s; active = gpu01's and gpu02's GPU 1.
    assert fl["total_ms"] == 7 * N_TICKS * TICK
    assert fl["active_ms"] == 2 * N_TICKS * TICK
    # idle-held: alice's three cards and carol's card on gpu03; gpu03's GPU 1 is truly idle.
    assert (fl["idle_held_ms"], fl["idle_ms"]) == (4 * N_TICKS * TICK, N_TICKS * TICK)
    window_ms = HOUR
    assert f["window"]["since_ms"] == T0 and f["window"]["until_ms"] == T0 + window_ms
    assert fl["idle_held_equivalent_gpus"] == round(4 * N_TICKS * TICK / window_ms, 4)
    assert fl["idle_held_gpu_hours"] == round(4 * N_TICKS * TICK / HOUR, 4)
    assert fl["active_share"] == round(2 / 7, 6)
    assert [h["status"] for h in f["hosts"]] == ["merged"] * 3
    assert [h["host"] for h in f["hosts"]] == ["gpu01", "gpu02", "gpu03"]


def test_a_user_on_three_hosts_is_one_line_with_per_host_detail(docs, tmp_path, capsys):
    f = fleet_json(capsys, *write_docs(tmp_path, *docs.values()))
    users = {u["user"]: u for u in f["identities"]["users"]}
    assert set(users) == {"alice", "bob", "carol"}
    alice = users["alice"]
    held = N_TICKS * TICK
    assert alice["hosts_total"] == 3 and alice["gpus"] == 3
    assert alice["held_ms"] == 3 * held and alice["idle_held_ms"] == 3 * held
    assert alice["uids"] == [1001, 2001]  # one name, a different uid on gpu03: still one person
    assert {h["host"]: h["held_ms"] for h in alice["hosts"]} == {"gpu01": held, "gpu02": held, "gpu03": held}
    assert alice["mem_mib_ms"] == (2000 + 4000 + 1000) * held
    # bob: busy on gpu01, idle on gpu02's busy card: his own idle-held counts there.
    assert users["bob"]["held_ms"] == 2 * held and users["bob"]["idle_held_ms"] == held
    # Sorted by held time, largest first (as the host report sorts).
    assert [u["user"] for u in f["identities"]["users"]][0] == "alice"


def test_worst_idle_held_gpus_name_host_gpu_and_holders(docs, tmp_path, capsys):
    f = fleet_json(capsys, *write_docs(tmp_path, *docs.values()))
    worst = f["worst_idle_held_gpus"]
    assert len(worst) == 4
    assert all(w["idle_held_ms"] == N_TICKS * TICK for w in worst)
    by_gpu = {(w["host"], w["index"]): w for w in worst}
    assert by_gpu[("gpu03", 2)]["holders"] == ["carol"]
    assert by_gpu[("gpu01", 0)]["holders"] == ["alice"] and by_gpu[("gpu01", 0)]["idle_held_share"] == 1.0


def test_text_report_fits_80_columns_with_every_section(docs, tmp_path, capsys):
    code, out, err = merge_run(capsys, "--tz", "UTC", *write_docs(tmp_path, *docs.values()))
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(x) for x in lines) <= 80, max(lines, key=len)
    _inert(out)
    assert lines[0] == "gua-report fleet: 3 hosts, 3 merged"
    assert lines[1] == "2024-01-01 00:00 -> 2024-01-01 01:00 UTC (1.0 h window)"
    for title in ("FLEET GPU TIME (3 hosts)", "HOSTS", "TOP IDENTITIES ACROSS HOSTS", "WORST IDLE-HELD GPUS",
                  "DATA QUALITY"):
        assert any(x.startswith(title) for x in lines), title
    assert "  6.98 GPU-h on 7 GPUs" in lines  # 7 x 3590 s
    assert any(x.startswith("  alice (3 hosts)") for x in lines)
    assert any(x.startswith("  idle-held") and "GPUs on average" in x for x in lines)
    detail = lines[next(i for i, x in enumerate(lines) if x.startswith("  alice (3 hosts)")) + 1]
    assert detail.startswith("    gpu0")
    assert "  gpu01: coverage 100.0 %; no gaps; no errors" in lines


def test_csv_has_the_json_values_in_long_rows(docs, tmp_path, capsys):
    paths = write_docs(tmp_path, *docs.values())
    code, out, _ = merge_run(capsys, "--format", "csv", *paths)
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["section", "subject", "metric", "value"]
    cell = {(s, subj, m): v for s, subj, m, v in rows[1:]}
    f = fleet_json(capsys, *paths)
    assert cell[("fleet", "", "idle_held_ms")] == str(f["fleet"]["idle_held_ms"])
    assert cell[("report", "", "command")] == "merge"
    assert cell[("host", "gpu02", "status")] == "merged"
    assert cell[("user", "alice", "hosts_total")] == "3"
    assert cell[("user_host", "alice/gpu03", "held_ms")] == str(N_TICKS * TICK)
    assert ("worst_gpu", "gpu03/GPU-gpu03-2", "holders") in cell


# ---------------------------------------------------------------- not mixed silently

def test_a_window_one_tick_apart_is_merged_more_is_flagged(docs, tmp_path, capsys):
    near, far = copy.deepcopy(docs["gpu02"]), copy.deepcopy(docs["gpu03"])
    near["window"]["since_ms"] += TICK  # fetched 10 s later: the same hour, to a tick
    near["window"]["until_ms"] += TICK
    far["window"]["until_ms"] += 2 * TICK + 1  # beyond a tick from both: another window
    f = fleet_json(capsys, *write_docs(tmp_path, docs["gpu01"], near, far))
    status = {h["host"]: h for h in f["hosts"]}
    assert status["gpu02"]["status"] == "merged"
    assert status["gpu03"]["status"] == "mismatch"
    assert status["gpu03"]["reason"] == ("its window (2024-01-01T00:00:00Z, 1.0 h) differs from the fleet's by 20s "
                                         "(more than one tick, 10s): not in the fleet totals")
    assert f["fleet"]["hosts_merged"] == 2
    assert f["fleet"]["total_ms"] == docs["gpu01"]["headline"]["total_ms"] + docs["gpu02"]["headline"]["total_ms"]
    assert "alice" in {u["user"] for u in f["identities"]["users"]}
    assert all(h["host"] != "gpu03" for u in f["identities"]["users"] for h in u["hosts"])


def test_the_fleets_window_is_the_one_most_hosts_share(docs, tmp_path, capsys):
    """The odd one out is flagged, whichever file comes first."""
    odd = copy.deepcopy(docs["gpu01"])
    odd["window"]["since_ms"] -= HOUR
    f = fleet_json(capsys, *write_docs(tmp_path, odd, docs["gpu02"], docs["gpu03"]))
    assert [h["status"] for h in f["hosts"]] == ["mismatch", "merged", "merged"]
    assert f["window"]["since_ms"] == T0


def test_different_thresholds_are_flagged(docs, tmp_path, capsys):
    path = build_host_db(str(tmp_path / "x.db"), "gpu03")
    other = host_json(path, "--active-threshold", "20")
    f = fleet_json(capsys, *write_docs(tmp_path, docs["gpu01"], docs["gpu02"], other))
    h = f["hosts"][2]
    assert h["status"] == "mismatch"
    assert h["reason"].startswith("thresholds differ (active 20 %, held 100000000 B; fleet: 10 %, 100000000 B)")


def test_a_newer_format_version_is_refused_an_older_one_accepted(docs, tmp_path, capsys):
    newer = copy.deepcopy(docs["gpu02"])
    newer["format_version"] = 3
    older = copy.deepcopy(docs["gpu03"])
    older["format_version"] = 1
    for u in older["identities"]["users"]:  # version 1 had no sm_unknown_ms
        del u["sm_unknown_ms"]
    paths = write_docs(tmp_path, docs["gpu01"], newer, older)
    f = fleet_json(capsys, *paths)
    by = {h["host"]: h for h in f["hosts"]}
    refused = next(h for h in f["hosts"] if h["status"] == "refused")
    assert refused["format_version"] == 3 and "upgrade gua-report here" in refused["reason"]
    assert by["gpu03"]["status"] == "merged" and by["gpu03"]["notes"][0].startswith("format_version 1")
    alice = next(u for u in f["identities"]["users"] if u["user"] == "alice")
    assert alice["sm_unknown_ms"] is None  # one host did not say: unknown, not 0
    code, out, _ = merge_run(capsys, "--tz", "UTC", *paths)
    assert code == 0
    assert "host1.json: format_version 3 is not one this gua-report" in out
    assert "note: format_version 1" in out


def test_the_same_database_twice_is_counted_once(docs, tmp_path, capsys):
    paths = write_docs(tmp_path, docs["gpu01"], docs["gpu01"])
    f = fleet_json(capsys, *paths)
    assert [h["status"] for h in f["hosts"]] == ["merged", "duplicate"]
    assert f["hosts"][1]["host"] == "gpu01#2"
    assert f["fleet"]["total_ms"] == docs["gpu01"]["headline"]["total_ms"]


def test_an_error_document_is_a_host_line_not_a_failure(docs, tmp_path, capsys):
    empty = build_host_db(str(tmp_path / "e.db"), "gpu03", ticks=0)
    err = host_json(empty)  # exit 8: no samples, with its JSON error document
    assert err["error"]["code"] == 8
    f = fleet_json(capsys, *write_docs(tmp_path, docs["gpu01"], err))
    h = f["hosts"][1]
    assert (h["status"], h["error_code"]) == ("error", 8)
    assert h["reason"].startswith("error 8: no samples between")
    code, out, _ = merge_run(capsys, *write_docs(tmp_path, docs["gpu01"], err))
    assert code == 0 and "host1.json: error 8: no samples between" in out


def test_no_host_merged_writes_the_report_and_exits_11(tmp_path, capsys):
    err = {"format_version": 2, "generator": "gua-report 0.2", "error": {"code": 4, "message": "permission denied"}}
    code, out, _ = merge_run(capsys, *write_docs(tmp_path, err))
    assert code == EXIT_NO_HOST
    assert "No host could be merged" in out and "host0.json: error 4: permission denied" in out
    f = fleet_json(capsys, *write_docs(tmp_path, err))
    assert f["fleet"]["hosts_merged"] == 0 and f["window"] is None


def test_stdin_with_several_documents_one_after_another(docs, tmp_path):
    """`for h in ...; do ssh $h gua-report --format json; done | gua-report merge -`."""
    stream = "".join(json.dumps(d, indent=2) + "\n" for d in docs.values())
    r = subprocess.run([sys.executable, "-m", "gua_report", "merge", "--format", "json", "-"],
                       input=stream, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    assert [h["host"] for h in f["hosts"]] == ["gpu01", "gpu02", "gpu03"]
    assert {h["source"] for h in f["hosts"]} == {"-"}


# ---------------------------------------------------------------- untrusted documents

def _edit(doc: dict, path: str, value) -> dict:
    d = copy.deepcopy(doc)
    *keys, last = path.split(".")
    node = d
    for k in keys:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return d


_DELETE = object()

BAD = [
    # (what, document or raw text, a fragment the one-line error must contain)
    ("not JSON", "{not json", "not JSON: Expecting property name"),
    ("empty", "", "empty: no JSON document"),
    ("a list", "[1, 2]", "expected a JSON object, got a list"),
    ("NaN", '{"format_version": NaN}', "NaN is not a number JSON allows"),
    ("infinite float", '{"format_version": 2, "x": 1e999}', "out of range"),
    ("5000 digits", '{"format_version": ' + "9" * 5000 + "}", "not a gua-report document"),
    ("nested", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not UTF-8", b'{"format_version": 2, "x": "\xff"}', "not UTF-8 text"),
    ("no format_version", {"hello": 1}, "format_version: missing"),
    ("format_version a string", {"format_version": "2"}, "format_version: expected an integer"),
]
EDITS = [
    ("headline.active_ms", "12", "headline.active_ms: expected an integer from 0 to 9007199254740992, got a string"),
    ("headline.active_ms", True, "headline.active_ms: expected an integer from 0 to 9007199254740992, got true"),
    ("headline.idle_ms", 10**30, "headline.idle_ms: expected an integer from 0 to 9007199254740992, got a huge number"),
    ("headline.idle_ms", -1, "got -1"),
    ("headline.total_ms", 1, "headline.total_ms: is not active_ms + idle_held_ms + idle_ms + unknown_ms"),
    ("window.since_ms", _DELETE, "window.since_ms: missing"),
    ("window.until_ms", 0, "window: since_ms is not before until_ms"),
    ("gpus.0.name", None, "gpus.0.name: expected a string, got null"),
    ("gpus", {"0": 1}, "gpus: expected a list, got an object"),
    ("identities.users.0.gpus", [1], "identities.users.0.gpus.0: expected a string, got 1"),
    ("headline.utilization_coverage", 1.5, "expected a share from 0 to 1 or null, got 1.5"),
    ("data_quality.warnings", "none", "data_quality.warnings: expected a list, got a string"),
    ("database", _DELETE, "database: missing"),
    ("command", "now", "is a `gua-report now` document, not a window report"),
    ("command", "merge", "is a fleet document"),
    ("error", {"code": "8"}, "error.code: expected an integer"),
]


@pytest.mark.parametrize("what,doc,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_document_is_one_line_naming_the_file(tmp_path, capsys, what, doc, message):
    (path,) = write_docs(tmp_path, doc)
    code, out, err = merge_run(capsys, path)
    assert code == EXIT_BAD_DOCUMENT, (what, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"gua-report merge: error: {path}: "), err
    assert message in err, err


@pytest.mark.parametrize("path,value,message", EDITS, ids=[e[0] + "=" + repr(e[1])[:12] for e in EDITS])
def test_a_field_of_the_wrong_type_or_range_is_named(docs, tmp_path, capsys, path, value, message):
    good, bad = write_docs(tmp_path, docs["gpu01"], _edit(docs["gpu02"], path, value))
    code, out, err = merge_run(capsys, good, bad)
    assert code == EXIT_BAD_DOCUMENT, err
    assert err == f"gua-report merge: error: {bad}: {message}\n" or message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_document_with_json_format_prints_an_error_document(tmp_path, capsys):
    (path,) = write_docs(tmp_path, "{")
    code, out, err = merge_run(capsys, "--format", "json", path)
    assert code == EXIT_BAD_DOCUMENT
    doc = json.loads(out)
    assert doc["command"] == "merge" and doc["error"]["code"] == EXIT_BAD_DOCUMENT
    assert doc["error"]["message"].startswith(f"{path}: not JSON")


def test_missing_or_unreadable_file_is_one_line(tmp_path, capsys):
    code, _, err = merge_run(capsys, str(tmp_path / "nope.json"))
    assert code == EXIT_BAD_DOCUMENT and "nope.json: cannot read (No such file or directory)" in err
    code, _, err = merge_run(capsys, str(tmp_path))
    assert code == EXIT_BAD_DOCUMENT and "cannot read (Is a directory)" in err
    code, _, err = merge_run(capsys, "-", "-")
    assert code == 2 and "may be given once" in err


def test_a_document_in_a_stream_is_named_by_its_number(docs, tmp_path, capsys):
    (path,) = write_docs(tmp_path, json.dumps(docs["gpu01"]) + "\n" + "[]")
    code, _, err = merge_run(capsys, path)
    assert code == EXIT_BAD_DOCUMENT
    assert f"{path}: document 2: expected a JSON object, got a list" in err


def test_oversized_input_is_refused_without_reading_it_all(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(merge_mod, "MAX_DOCUMENT_BYTES", 1000)
    (path,) = write_docs(tmp_path, " " * 2000 + "{}")
    code, _, err = merge_run(capsys, path)
    assert code == EXIT_BAD_DOCUMENT and "larger than" in err


# ---------------------------------------------------------------- hostile strings

EVIL_HOST = "@gpu\r01\x1b]0;pwned\x07\u202e"
EVIL_USER = "=evil\x1b[2J\u202eroot\nFAKE LINE"
EVIL_GPU = "NVIDIA +H100\x1b[31m\u2066"
EVIL_WARN = "-warn\x1b[8m\n  FAKE: ok\x9b"
EVIL_ERR = "@no\x1b[5msamples\u061c\r\nFAKE"


@pytest.fixture()
def evil_paths(docs, tmp_path) -> list[str]:
    d = copy.deepcopy(docs["gpu01"])
    d["database"]["hostnames"] = [EVIL_HOST]
    d["identities"]["users"][0]["user"] = EVIL_USER
    d["gpus"][0]["name"] = EVIL_GPU
    d["data_quality"]["warnings"] = [EVIL_WARN]
    err = {"format_version": 2, "generator": "x", "error": {"code": 8, "message": EVIL_ERR}}
    return write_docs(tmp_path, d, docs["gpu02"], err)


def test_text_escapes_every_string_from_a_document(evil_paths, capsys):
    code, out, _ = merge_run(capsys, *evil_paths)
    assert code == 0
    _inert(out)
    lines = out.splitlines()
    assert max(len(x) for x in lines) <= 80
    assert not any(x.lstrip().startswith("FAKE") for x in lines), out
    assert "@gpu\\r01\\x1b]0;pwned\\x07\\u202e" in out
    assert "=evil\\x1b[2J\\u202eroot\\nFAKE" in out
    assert "+H100\\x1b[31m\\u20~" in out  # cut to its column
    assert "-warn\\x1b[8m\\n  FAKE: ok\\x9b" in out
    assert "@no\\x1b[5msamples\\u061c\\r\\nFAKE" in out


def test_json_keeps_strings_exactly_and_csv_neutralises_formulas(evil_paths, capsys):
    f = fleet_json(capsys, *evil_paths)
    assert f["hosts"][0]["host"] == EVIL_HOST
    assert EVIL_USER in {u["user"] for u in f["identities"]["users"]}
    code, out, _ = merge_run(capsys, "--format", "csv", *evil_paths)
    assert code == 0
    rows = list(csv.reader(io.StringIO(out, newline="")))
    cells = [c for r in rows for c in r]
    assert "'" + EVIL_HOST in cells and "'" + EVIL_USER in cells
    assert not any(c.startswith(("=", "+", "@")) or (c.startswith("-") and not c.lstrip("-").isdigit())
                   for c in cells), [c for c in cells if c[:1] in "=+-@"]
    # The row that carries a bare CR is quoted whole, so no spreadsheet splits it.
    assert '"host","' in out


# ---------------------------------------------------------------- the command line

def test_merge_is_a_subcommand_with_its_own_help(tmp_path):
    r = run_report("merge", "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0
    assert max(len(x) for x in r.stdout.splitlines()) <= 80
    assert "10 a FILE is unreadable or not a gua-report JSON document" in r.stdout
    r = run_report("merge")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 + r.stderr.count("usage") * 1


def test_merge_end_to_end_through_the_installed_command(docs, tmp_path):
    paths = write_docs(tmp_path, *docs.values())
    r = run_report("merge", "--tz", "UTC", *paths)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gua-report fleet: 3 hosts, 3 merged\n")
    assert os.path.basename(paths[0]) not in r.stdout  # hosts are named by their hostnames


# ---------------------------------------------------------------- the contract

JSON_MD = Path(__file__).resolve().parent.parent / "reporter" / "JSON.md"


def _documented(table_after: str) -> set[str]:
    """The `field` names of the first table after a heading line of JSON.md's merge section."""
    text = JSON_MD.read_text()
    text = text[text.index("## `gua-report merge` and `--ssh`"):]
    text = text[text.index(table_after):]
    rows = []
    for line in text.splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names = set()
    for row in rows[2:]:
        names |= {n for n in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    return names


def test_json_md_documents_every_field_of_the_fleet_document(docs, tmp_path, capsys):
    f = fleet_json(capsys, *write_docs(tmp_path, *docs.values()))
    assert set(f) == _documented("Versions:")
    assert set(f["hosts"][0]) == _documented("host:")


def test_merge_reads_the_version_this_gua_report_writes():
    """Bumping render_json.FORMAT_VERSION must come with a look at merge.py (and this tuple)."""
    from gua_report.render_json import FORMAT_VERSION

    assert FORMAT_VERSION in merge_mod.KNOWN_HOST_VERSIONS


def test_a_huge_string_is_shown_in_part(docs, tmp_path, capsys):
    """A host cannot flood the admin's screen: text shows a bounded part, JSON all of it."""
    flood = {"format_version": 2, "error": {"code": 8, "message": "\x1b[2J" * 200_000}}
    noisy = copy.deepcopy(docs["gpu02"])
    noisy["data_quality"]["warnings"] = ["w" * 100_000] * 50
    paths = write_docs(tmp_path, docs["gpu01"], noisy, flood)
    code, out, _ = merge_run(capsys, *paths)
    assert code == 0
    _inert(out)
    assert len(out.splitlines()) < 120 and len(out) < 10_000
    assert "... 42 more warnings (see --format json)" in out
    assert len(fleet_json(capsys, *paths)["hosts"][2]["reason"]) == len("error 8: ") + 800_000
