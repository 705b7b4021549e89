"""The real gua-collector process against a fake NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from collector_helpers import clean_env, collector_cmd

pytestmark = pytest.mark.timeout(60)

WATCHDOG_USEC = 1_000_000  # systemd would expect a ping at least every 0.5 s


class FakeSystemd:
    """Binds a unix datagram socket and records what the service sends, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[tuple[float, str]] = []

    def read_until(self, predicate, timeout: float) -> bool:
        """Collect messages until predicate(messages) holds or timeout passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))
            if predicate(self.messages):
                return True
        return predicate(self.messages)

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.messages if m == message]

    def close(self) -> None:
        self.sock.close()


def start(tmp_path: Path, scenario: str, interval: str = "1s", **env: str) -> tuple[subprocess.Popen[str], FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    proc = subprocess.Popen(
        collector_cmd("--db", str(tmp_path / "gua.db"), "--backend", f"simulate:{scenario}", "--interval", interval),
        env=clean_env(NOTIFY_SOCKET=str(fake.path), WATCHDOG_USEC=str(WATCHDOG_USEC), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, fake


def test_ready_status_watchdog_and_clean_stop(tmp_path: Path) -> None:
    # A 5 s interval is longer than the 0.5 s ping period: pings must come between ticks.
    proc, fake = start(tmp_path, "lab", interval="5s")
    try:
        assert fake.read_until(lambda ms: any(m == "READY=1" for _, m in ms), 15), fake.messages
        ready_at = fake.times("READY=1")[0]
        # The first tick is committed before READY=1.
        with sqlite3.connect(f"file:{tmp_path / 'gua.db'}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] >= 1
        fake.read_until(lambda ms: ms[-1][0] - ready_at > 3.0, 6)
        statuses = [m for _, m in fake.messages if m.startswith("STATUS=")]
        assert statuses and "4 GPUs" in statuses[-1], statuses
        pings = [t for t in fake.times("WATCHDOG=1") if t > ready_at]
        assert len(pings) >= 5, f"expected pings every <=0.5 s, got {len(pings)} in 3 s"
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) <= WATCHDOG_USEC / 1e6, f"longest silence {max(gaps):.2f}s exceeds WATCHDOG_USEC"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
        fake.read_until(lambda ms: any(m == "STOPPING=1" for _, m in ms), 2)
        assert fake.times("STOPPING=1"), fake.messages
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr
        with sqlite3.connect(tmp_path / "gua.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stopped = conn.execute("SELECT stopped_ms FROM run").fetchone()[0]
            assert stopped is not None, "a clean stop is recorded"
    finally:
        proc.kill()
        fake.close()


def test_hung_backend_starves_the_watchdog(tmp_path: Path) -> None:
    proc, fake = start(tmp_path, "hang", interval="1s")
    try:
        assert fake.read_until(lambda ms: any(m == "READY=1" for _, m in ms), 15), fake.messages
        # The hang scenario blocks inside a device read after a few ticks.
        fake.read_until(lambda ms: False, 8)
        pings = fake.times("WATCHDOG=1")
        assert pings, "pinged while healthy"
        silence = time.monotonic() - pings[-1]
        assert silence > 3.0, f"pings kept coming ({silence:.1f}s since the last) although sampling hangs"
        assert proc.poll() is None, "still running (hung), as a D-state NVML call would leave it"
    finally:
        proc.kill()
        proc.wait()
        fake.close()


def test_runs_silently_without_notify_socket(tmp_path: Path) -> None:
    proc = subprocess.run(
        collector_cmd("--db", str(tmp_path / "gua.db"), "--backend", "simulate:lab", "--ticks", "3"),
        env=clean_env(), capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(tmp_path / "gua.db") as conn:
        assert conn.execute("SELECT count(*) FROM tick").fetchone()[0] == 3
