"""Boot a directory tree with systemd-nspawn and drive it from the host.

The recipe that works on these hosts (no booted systemd on the host,
cgroup v1 hybrid): ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 setsid
systemd-nspawn --register=no --keep-unit -q -D ROOT --boot`` in the
background. The container's PID 1 is the ``systemd`` child of the nspawn
process; commands run inside with ``nsenter -t PID1 -a``.

Teardown always ends the container: ``systemctl poweroff`` first, then
SIGKILL to the container's PID 1 and to nspawn's own process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The environment a command inside the container starts with (nsenter would
# otherwise pass on the host's, virtualenv and all).
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


class BootFailed(Exception):
    """The container did not come up; the host cannot run the system test."""


class Container:
    """One booted systemd-nspawn container rooted at ``root``."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None

    # -- lifecycle -----------------------------------------------------
    def boot(self, timeout: float = 60.0) -> str:
        """Start nspawn in the background and wait until systemd is up.

        Returns the state ``systemctl is-system-running --wait`` reported
        ("running" or "degraded"). Raises BootFailed with the console log's
        tail when nspawn exits early or the boot does not finish in time.
        """
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "-q",
             "--console=read-only", "-D", str(self.root), "--boot"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        self.pid1 = self._wait_for_pid1(deadline)
        private = Path(f"/proc/{self.pid1}/root/run/systemd/private")
        while not private.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise BootFailed(f"no {private} after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.05)
        left = max(5.0, deadline - time.monotonic())
        result = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
        state = result.stdout.strip()
        if state not in ("running", "degraded"):
            raise BootFailed(
                f"systemctl is-system-running --wait said {state!r} "
                f"(exit {result.returncode}): {result.stderr.strip()}\n{self.log_tail()}"
            )
        return state

    def _check_alive(self) -> None:
        """Raise BootFailed when nspawn has already exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BootFailed(
                f"systemd-nspawn exited with {self.proc.returncode} during boot\n"
                + self.log_tail()
            )

    def _wait_for_pid1(self, deadline: float) -> int:
        """Find the nspawn child that has exec'd systemd."""
        assert self.proc is not None
        while True:
            self._check_alive()
            for pid in _children(self.proc.pid):
                if _comm(pid) == "systemd":
                    return pid
            if time.monotonic() > deadline:
                raise BootFailed("no systemd child of systemd-nspawn appeared\n"
                                 + self.log_tail())
            time.sleep(0.02)

    def shutdown(self, timeout: float = 20.0) -> None:
        """Power the container off; kill it if it does not go in time.

        Safe to call more than once and after a failed boot.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid1 is not None:
            try:
                subprocess.run(
                    self._nsenter(["systemctl", "poweroff", "--no-block"]),
                    capture_output=True, timeout=10, env=CONTAINER_ENV,
                )
            except (subprocess.TimeoutExpired, OSError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            if self.pid1 is not None:
                _kill(self.pid1, signal.SIGKILL)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.pid1 = None

    # -- commands --------------------------------------------------------
    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        """The host command line that runs ``argv`` in all the container's namespaces."""
        assert self.pid1 is not None, "container not booted"
        return ["nsenter", "-t", str(self.pid1), "-a", "--", *argv]

    def run(self, argv: Sequence[str] | str, timeout: float = 60.0,
            check: bool = False, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (a str goes to ``sh -c``).

        Output is captured as text. With ``check=True`` a non-zero exit
        raises AssertionError naming the command and its output.
        """
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        result = subprocess.run(
            self._nsenter(argv), capture_output=True, text=True,
            timeout=timeout, env=CONTAINER_ENV, input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in container: {' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
            )
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        result = self.run(["systemctl", "show", unit, "-p", ",".join(props)], check=True)
        out: dict[str, str] = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def wait_for(self, unit: str, predicate: Callable[[dict[str, str]], bool],
                 props: Sequence[str],
                 timeout: float, what: str) -> dict[str, str]:
        """Poll ``show(unit, *props)`` until ``predicate(values)`` holds.

        Raises AssertionError saying ``what`` was awaited and the last values.
        """
        deadline = time.monotonic() + timeout
        while True:
            values = self.show(unit, *props)
            if predicate(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{unit}: timed out after {timeout:.0f} s waiting for {what}; "
                    f"last: {values}"
                )
            time.sleep(0.25)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of nspawn's console output."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def path(self, inside: str) -> Path:
        """Host path of a file inside the container's (unmounted) tree."""
        return self.root / inside.lstrip("/")


def _children(pid: int) -> list[int]:
    """Child pids of ``pid`` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            except OSError:
                continue
            found += [int(x) for x in text.split()]
    except OSError:
        pass
    return found


def _comm(pid: int) -> str:
    """The command name of ``pid`` ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; a process already gone is fine."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
