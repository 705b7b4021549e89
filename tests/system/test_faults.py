"""System test: faults a host really has at boot, under a real systemd.

The collector must not leave systemd a state it will not restart from
(DESIGN.md, threat model). Two cases, each in this module's own container
(conftest.py), after the .debs are installed:

- NVML missing at start (simulate:late: the driver "loads" LATE_S seconds
  after the collector started, longer than systemd's 90 s start timeout):
  the unit is active at once and says "waiting for NVML", is not
  restarted, and records ticks when NVML appears; the report shows the
  wait as a gap.
- The disk holding /var/lib/gua full at start (a small tmpfs mounted
  there, filled by a root-owned file): the unit is active, says "waiting
  for the database", never fails for good, and records ticks within a
  minute or so of the space being freed.

Run as root:  python -m pytest -m system -v -rs tests/system/test_faults.py
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import nspawn
import pytest
from systest import ADMIN, CONF, DB, UNIT, collector_conf, db_facts, journal, log

from gua_collector.simulate import LATE_S

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

# systemctl start returns once READY=1 arrives; a collector that holds it
# back until NVML or the DB is usable keeps systemctl blocked for 90 s
# (then systemd kills it). Much less than 90 s tells the two apart.
START_RETURNS_S = 30
# The collector retries with exponential backoff capped at 60 s.
BACKOFF_MAX_S = 60
SUMMARY = re.compile(r"^\d+ GPUs, \d+ processes, \d+ idle-held")
STATE_PROPS = ("ActiveState", "SubState", "NRestarts", "Result", "ExecMainStatus",
               "MainPID", "StatusText")
STATE_DIR = "/var/lib/gua"


def _now(box: nspawn.Container) -> str:
    """The container's clock, in the form journalctl --since takes."""
    return box.run(["date", "+%Y-%m-%d %H:%M:%S.%6N"], check=True).stdout.strip()


def _start(box: nspawn.Container, since: str, what: str) -> float:
    """systemctl start the collector; it must return (READY=1) soon.

    Returns the seconds it took.
    """
    started = time.monotonic()
    try:
        result = box.run(["systemctl", "start", UNIT], timeout=START_RETURNS_S)
    except subprocess.TimeoutExpired:
        state = box.show(UNIT, *STATE_PROPS)
        raise AssertionError(
            f"systemctl start {UNIT} ({what}) did not return within {START_RETURNS_S} s: "
            f"the collector does not send READY=1 while it waits, so systemd's start "
            f"timeout will kill it; {state}\n{journal(box, since)[-3000:]}") from None
    took = time.monotonic() - started
    if result.returncode != 0:
        state = box.show(UNIT, *STATE_PROPS)
        raise AssertionError(
            f"systemctl start {UNIT} ({what}) exited {result.returncode} after {took:.1f} s: "
            f"{result.stderr.strip()}\n{state}\n{journal(box, since)[-3000:]}")
    return took


def _report_json(box: nspawn.Container) -> dict[str, Any]:
    """gua-report --format json over the last hour, as a gua group member."""
    result = box.run(["runuser", "-u", ADMIN, "--", "gua-report", "--since", "1h",
                      "--format", "json"])
    assert result.returncode == 0, (
        f"gua-report --format json as {ADMIN} exited {result.returncode}:\n"
        f"{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def _assert_no_traceback(box: nspawn.Container, since: str) -> str:
    text = journal(box, since)
    assert "Traceback" not in text, (
        "the collector's journal has a Python traceback:\n"
        + text[max(0, text.find("Traceback") - 500):][:4000])
    return text


def _stop(box: nspawn.Container) -> None:
    box.run(["systemctl", "stop", UNIT], timeout=60)
    box.run(["systemctl", "reset-failed", UNIT])


# ------------------------------------------------------------------- tests
def test_late_nvml_is_waited_for_while_active(installed: nspawn.Container,
                                              request: pytest.FixtureRequest) -> None:
    """NVML missing at start (driver not loaded yet): READY=1 anyway, the
    unit is active/running with STATUS "waiting for NVML: ...", the watchdog
    is fed (WatchdogSec=6s here) and nothing restarts; once NVML is there
    ticks are recorded, STATUS is the GPU summary, and the wait is a gap."""
    box = installed
    box.path(CONF).write_text(collector_conf("simulate:late"))
    since = _now(box)
    start_ms = time.time_ns() // 1_000_000
    t0 = time.monotonic()
    try:
        took = _start(box, since, "simulate:late, NVML missing")
        # STATUS= may follow READY=1 by a moment.
        box.wait_for(UNIT, lambda v: v["StatusText"] != "", ["StatusText"], timeout=5,
                     what="a StatusText after READY=1")
        state = box.show(UNIT, *STATE_PROPS)
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), (
            f"while NVML is missing: {state}\n{journal(box, since)[-3000:]}")
        assert "waiting for NVML" in state["StatusText"], (
            f"while NVML is missing, StatusText is {state['StatusText']!r}: {state}")
        first_status = state["StatusText"]

        # Poll until the summary shows; the unit must stay up all along.
        deadline = t0 + LATE_S + BACKOFF_MAX_S + 30
        polls = 0
        while True:
            state = box.show(UNIT, *STATE_PROPS)
            elapsed = time.monotonic() - t0
            polls += 1
            assert (state["ActiveState"], state["SubState"], state["NRestarts"]) \
                == ("active", "running", "0"), (
                f"{elapsed:.0f} s after start (NVML due at {LATE_S} s) the unit is not "
                f"steadily running: {state}\n{journal(box, since)[-3000:]}")
            status = state["StatusText"]
            if SUMMARY.match(status):
                break
            assert "waiting for NVML" in status, (
                f"{elapsed:.0f} s after start: StatusText is neither 'waiting for NVML' "
                f"nor the GPU summary: {status!r}")
            assert time.monotonic() < deadline, (
                f"no GPU summary {deadline - t0:.0f} s after start (NVML came at "
                f"{LATE_S} s, backoff is capped at {BACKOFF_MAX_S} s): {state}\n"
                f"{journal(box, since)[-3000:]}")
            time.sleep(1.0)
        up_s = time.monotonic() - t0
        assert up_s >= LATE_S - 2, (
            f"the GPU summary showed {up_s:.0f} s after start, before simulate:late's "
            f"NVML existed ({LATE_S} s)")
        assert "4 GPUs" in status, f"simulate:late has the lab's 4 GPUs: {status!r}"

        # Ticks are written, and none while NVML was missing.
        tick_deadline = time.monotonic() + 20
        facts = db_facts(box)
        while facts["ticks"] < 3 and time.monotonic() < tick_deadline:
            time.sleep(0.5)
            facts = db_facts(box)
        assert facts["ticks"] >= 3, f"too few ticks after NVML came up: {facts}"
        assert facts["first_tick_ms"] >= start_ms + (LATE_S - 2) * 1000, (
            f"a tick was recorded {(facts['first_tick_ms'] - start_ms) / 1000:.0f} s "
            f"after start, while NVML was still missing: {facts}")
        state = box.show(UNIT, *STATE_PROPS)
        assert state["NRestarts"] == "0", f"the collector restarted: {state}"

        # The wait is a gap in the report's data quality section.
        quality = _report_json(box)["data_quality"]
        gaps = quality["gap_events"]
        covering = [g for g in gaps
                    if g["start_ms"] <= start_ms + 5_000
                    and g["end_ms"] >= start_ms + (LATE_S - 2) * 1000]
        assert covering, (
            f"gua-report lists no gap covering the {LATE_S} s NVML was missing "
            f"(started at {start_ms}, first tick {facts['first_tick_ms']}): "
            f"gap_events={gaps}, host_errors={quality['host_errors']}")
        gap = covering[0]

        text = _assert_no_traceback(box, since)
        said = text.count("simulated: NVIDIA driver not loaded yet")
        assert said == 1, (
            f"the NVML failure should be logged once (DESIGN.md), not {said} times:\n"
            f"{text[-3000:]}")
        log(request, f"[gua-systest] late NVML: systemctl start returned in {took:.1f} s "
                     f"({first_status!r}); GPU summary {up_s:.0f} s after start "
                     f"(NVML due at {LATE_S} s, {polls} polls); gap "
                     f"{(gap['end_ms'] - gap['start_ms']) / 1000:.0f} s "
                     f"({gap['detail']!r})")
    finally:
        _stop(box)
        box.path(CONF).write_text(collector_conf("simulate:lab"))


@pytest.mark.parametrize("existing_db", [True, False], ids=["existing-db", "no-db"])
def test_full_disk_at_start_is_waited_out(installed: nspawn.Container,
                                          request: pytest.FixtureRequest,
                                          existing_db: bool) -> None:
    """/var/lib/gua full at start (a tmpfs filled by a root-owned file): the
    unit is active/running with STATUS "waiting for the database: ...",
    neither exits 7 nor reaches a state systemd gives up on; once the file
    is deleted it records ticks and STATUS is the GPU summary again."""
    box = installed
    _stop(box)
    box.run(f"mkdir -p {STATE_DIR} && mount -t tmpfs "
            f"-o size=4m,mode=0750,uid=$(id -u gua),gid=$(id -g gua) gua-systest {STATE_DIR}",
            check=True)
    try:
        before = 0
        if existing_db:
            # A DB with some history, made by the installed collector itself
            # (fast-forward: simulated clock).
            box.run(["runuser", "-u", "gua", "--", "gua-collector", "--db", DB,
                     "--backend", "simulate:lab", "--interval", "10s", "--ticks", "30"],
                    check=True, timeout=60)
            before = db_facts(box)["ticks"]
        # cat writes until ENOSPC, the last write partly: nothing is left.
        box.run(f"cat /dev/zero > {STATE_DIR}/filler", timeout=60)
        free = box.run(["df", "-B1", "--output=avail", STATE_DIR], check=True).stdout.split()
        assert free[-1] == "0", f"{STATE_DIR} is not full: df says {free}"
        listing = box.run(["ls", "-la", STATE_DIR]).stdout

        since = _now(box)
        t0 = time.monotonic()
        took = _start(box, since, "disk full")
        # Watch it for a while: up and waiting, never failed.
        hold_until = time.monotonic() + 8
        while True:
            state = box.show(UNIT, *STATE_PROPS)
            assert state["ActiveState"] not in ("failed", "inactive"), (
                f"with {STATE_DIR} full the unit went {state['ActiveState']}: {state}\n"
                f"{journal(box, since)[-3000:]}")
            if time.monotonic() >= hold_until:
                break
            time.sleep(0.5)
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), (
            f"with {STATE_DIR} full: {state}\n{journal(box, since)[-3000:]}")
        assert "waiting for the database" in state["StatusText"], (
            f"with {STATE_DIR} full, StatusText is {state['StatusText']!r}: {state}\n"
            f"{listing}\n{journal(box, since)[-3000:]}")
        waiting_status = state["StatusText"]

        box.run(["rm", "-f", f"{STATE_DIR}/filler"], check=True)
        freed = time.monotonic()
        deadline = freed + 90
        while True:
            state = box.show(UNIT, *STATE_PROPS)
            assert state["ActiveState"] not in ("failed", "inactive"), (
                f"after the space was freed the unit went {state['ActiveState']}: "
                f"{state}\n{journal(box, since)[-3000:]}")
            if SUMMARY.match(state["StatusText"]):
                facts = db_facts(box)
                if facts["ticks"] > before:
                    break
            assert time.monotonic() < deadline, (
                f"90 s after the space was freed the collector does not record: "
                f"{state}\n{journal(box, since)[-3000:]}")
            time.sleep(1.0)
        recovered_s = time.monotonic() - freed
        assert facts["integrity"] == ["ok"], facts
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        text = _assert_no_traceback(box, since)
        exits = [line for line in text.splitlines() if "code=exited" in line]
        assert not any("status=7/" in line for line in exits), (
            "the collector exited 7 (corrupt: systemd does not restart that) on a full "
            "disk:\n" + "\n".join(exits))
        log(request, f"[gua-systest] disk full ({'existing DB' if existing_db else 'no DB'}): "
                     f"systemctl start returned in {took:.1f} s ({waiting_status!r}); "
                     f"recording {recovered_s:.1f} s after the space was freed; "
                     f"NRestarts={state['NRestarts']}; {facts['ticks'] - before} new ticks; "
                     f"{time.monotonic() - t0:.0f} s in all")
    finally:
        _stop(box)
        if box.run(["umount", STATE_DIR]).returncode != 0:
            box.run(["umount", "-l", STATE_DIR])
    assert box.run(["mountpoint", "-q", STATE_DIR]).returncode != 0, \
        f"{STATE_DIR} is still a mount point after the test"
