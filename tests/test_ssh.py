"""`gua-report --ssh HOSTS`: the report on each host over ssh, merged into one fleet report.

The end-to-end tests start real OpenSSH servers on loopback ports (as the
current user; root in CI), with throwaway host and user keys in a temporary
directory and an ssh_config of their own, passed with --ssh-config:

- sshd A serves gpu01 and gpu02 (one server, two names; the client's SetEnv
  tells the remote wrapper which database to read) and `slow`;
- sshd B serves gpu03, where the remote command does not exist;
- gpu04 is a port nothing listens on.

The remote program is a wrapper named with --ssh-command (gua-report-test,
so that a gua-report installed on the machine cannot answer for gpu03).
Every process started here is stopped here (as root, /run/sshd is made
if missing, as the openssh-server package makes it at boot, and kept).
Skipped, with the reason, where sshd, ssh or ssh-keygen is missing.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gua_report import ssh
from gua_report.cli import DEFAULT_DB, _options, make_parser
from gua_report.merge import EXIT_NO_HOST, FAILED, MERGED, NO_GUA, UNREACHABLE
from report_helpers import run_report
from test_merge import SINCE, UNTIL, build_host_db, host_json

pytestmark = pytest.mark.timeout(120)

SSHD = "/usr/sbin/sshd"
WINDOW = ("--since", SINCE, "--until", UNTIL, "--tz", "UTC")
REMOTE = "gua-report-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int, proc: subprocess.Popen) -> bool:
    """True once sshd accepts connections; False if it exited (its port was taken meanwhile)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _start_sshd(cfg: Path, log: Path, servers: list[subprocess.Popen]) -> int:
    """sshd -D on a free loopback port; a few tries, as another process may take the port first."""
    for _ in range(3):
        port = _free_port()
        with open(log, "w") as logf:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg), "-p", str(port)],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        servers.append(proc)
        if _listening(port, proc):
            return port
        proc.kill()
        proc.wait()
    pytest.fail(f"sshd did not start: {log.read_text()}")


def _sshd_config(d: Path, name: str, path_env: str) -> Path:
    root = os.geteuid() == 0
    cfg = d / f"sshd_{name}.conf"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\n"
        f"HostKey {d}/host_key\n"
        "PidFile none\n"
        f"AuthorizedKeysFile {d}/authorized_keys\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        + ("PermitRootLogin prohibit-password\n" if root else "")
        + "AcceptEnv GUA_TEST_HOST\n"
        # sshd's SetEnv overrides the session's default PATH: what the remote
        # shell can find is exactly this.
        f"SetEnv PATH={path_env}\n"
        "LogLevel ERROR\n"
    )
    return cfg


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    missing = [name for name, found in ((SSHD, os.access(SSHD, os.X_OK)), ("ssh", shutil.which("ssh")),
                                        ("ssh-keygen", shutil.which("ssh-keygen"))) if not found]
    if missing:
        pytest.skip(f"needs OpenSSH: {', '.join(missing)} not found (apt-get install openssh-server "
                    "openssh-client)")
    d = tmp_path_factory.mktemp("sshfleet")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gua-test", "-f", str(d / key)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    for host in ("gpu01", "gpu02"):
        build_host_db(str(d / f"{host}.db"), host)
    bindir = d / "bin"
    bindir.mkdir()
    wrapper = bindir / REMOTE
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$GUA_TEST_HOST" in\n'
        f'  gpu01|gpu02) exec {shlex.quote(sys.executable)} -m gua_report --db {d}/"$GUA_TEST_HOST".db "$@" ;;\n'
        f"  slow) echo $$ >> {d}/slow.pids; exec sleep 60 ;;\n"
        '  *) echo "no such test host" >&2; exit 99 ;;\n'
        "esac\n"
    )
    wrapper.chmod(0o755)
    # As root, sshd needs its privilege separation directory, which the
    # package's tmpfiles.d makes at boot (a container may not have booted).
    # It is made here as the package would and left in place: another test
    # run's sshd may be using it at the same time.
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
    servers: list[subprocess.Popen] = []
    ports = {}
    try:
        for name, path_env in (("a", f"{bindir}:/usr/bin:/bin"), ("b", "/usr/bin:/bin")):
            ports[name] = _start_sshd(_sshd_config(d, name, path_env), d / f"sshd_{name}.log", servers)
        dead = _free_port()  # nothing listens here: connection refused
        me = pwd.getpwuid(os.getuid()).pw_name
        config = d / "ssh_config"
        config.write_text(
            "Host gpu01\n  SetEnv GUA_TEST_HOST=gpu01\n"
            "Host gpu02\n  SetEnv GUA_TEST_HOST=gpu02\n"
            "Host slow\n  SetEnv GUA_TEST_HOST=slow\n"
            f"Host gpu01 gpu02 slow\n  HostName 127.0.0.1\n  Port {ports['a']}\n"
            f"Host gpu03\n  HostName 127.0.0.1\n  Port {ports['b']}\n"
            f"Host gpu04\n  HostName 127.0.0.1\n  Port {dead}\n"
            f"Host *\n  User {me}\n  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking no\n  LogLevel ERROR\n  ControlMaster no\n  ControlPath none\n"
        )
        yield {"dir": d, "config": str(config), "dbs": {h: str(d / f"{h}.db") for h in ("gpu01", "gpu02")}}
    finally:
        pids = d / "slow.pids"
        for pid in (int(x) for x in pids.read_text().split()) if pids.exists() else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in servers:
            if proc.poll() is None:
                proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fleet_report(fleet, hosts: str, *extra: str, fmt: str = "json") -> subprocess.CompletedProcess:
    return run_report("--ssh", hosts, "--ssh-config", fleet["config"], "--ssh-command", REMOTE,
                      "--format", fmt, *extra)


# ---------------------------------------------------------------- against real sshd

def test_ssh_fleet_merges_reachable_hosts_and_lists_the_others(fleet):
    t = time.monotonic()
    r = fleet_report(fleet, "gpu01,gpu02,gpu03,gpu04", *WINDOW)
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    by = {h["host"]: h for h in f["hosts"]}
    assert [h["host"] for h in f["hosts"]] == ["gpu01", "gpu02", "gpu03", "gpu04"]
    assert (by["gpu01"]["status"], by["gpu02"]["status"]) == (MERGED, MERGED)
    assert by["gpu01"]["source"] == "ssh" and by["gpu01"]["hostnames"] == ["gpu01"]
    assert by["gpu03"]["status"] == NO_GUA
    assert by["gpu03"]["reason"].startswith(f"{REMOTE} not found on the host (exit 127")
    assert "not found" in by["gpu03"]["reason"] and "--ssh-command" in by["gpu03"]["reason"]
    assert by["gpu04"]["status"] == UNREACHABLE
    assert "Connection refused" in by["gpu04"]["reason"]
    # Each host answered the window given here, to the millisecond.
    local = [host_json(fleet["dbs"][h]) for h in ("gpu01", "gpu02")]
    assert f["window"]["since_ms"] == local[0]["window"]["since_ms"]
    assert f["window"]["until_ms"] == local[0]["window"]["until_ms"]
    for key in ("total_ms", "active_ms", "idle_held_ms", "idle_ms", "unknown_ms"):
        assert f["fleet"][key] == sum(d["headline"][key] for d in local), key
    alice = next(u for u in f["identities"]["users"] if u["user"] == "alice")
    assert [h["host"] for h in alice["hosts"]] == ["gpu01", "gpu02"]
    assert elapsed < 30, elapsed  # hosts run at once


def test_ssh_fleet_text_report(fleet):
    r = fleet_report(fleet, "gpu01,gpu02,gpu03,gpu04", *WINDOW, fmt="text")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    assert lines[0] == "gua-report fleet: 4 hosts, 2 merged, 2 not (see HOSTS)"
    row = {x.split()[0]: x for x in lines if x.startswith("  gpu0") and x.rstrip().endswith(
        ("merged", "no gua-report", "unreachable"))}
    assert row["gpu03"].endswith("no gua-report") and row["gpu04"].endswith("unreachable")
    assert any(x.startswith("  gpu04: ssh: connect to host 127.0.0.1 port") for x in lines)


def test_a_host_that_does_not_answer_in_time_is_a_line(fleet):
    t = time.monotonic()
    r = fleet_report(fleet, "gpu01,slow", *WINDOW, "--ssh-timeout", "3s")
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    assert [(h["host"], h["status"]) for h in f["hosts"]] == [("gpu01", MERGED), ("slow", FAILED)]
    assert f["hosts"][1]["reason"] == "no answer within 3 s (--ssh-timeout)"
    assert 3 <= elapsed < 20, elapsed


def test_the_remote_shell_gets_every_word_exactly(fleet):
    """A --user with quotes, spaces and $(...) reaches the remote gua-report as one word, and runs nothing."""
    marker = fleet["dir"] / "pwned"
    evil = f"it's $(touch {marker}); `touch {marker}` \"x\" \\ ;|&"
    r = fleet_report(fleet, "gpu01,gpu02", *WINDOW, "--user", evil)
    assert r.returncode == EXIT_NO_HOST, r.stderr  # both hosts: no such user (exit 2, a JSON error)
    f = json.loads(r.stdout)
    for h in f["hosts"]:
        assert (h["status"], h["error_code"]) == ("error", 2)
        assert h["reason"].startswith(f"error 2: no user matches --user {evil!r}"), h["reason"]
    assert not marker.exists()


# ---------------------------------------------------------------- no server needed

@pytest.mark.parametrize("spec", [
    "-oProxyCommand=touch /tmp/x", "gpu01;id", "gpu01 gpu02", "$(id)", "`id`", "gpu01|id", "gpu01\nid",
    "gpu'01", "--", "@gpu01", "gpu01&", "gpu01>x", "a@-oProxyCommand=x", "", " , ",
])
def test_a_host_that_is_not_a_name_is_refused(spec):
    with pytest.raises(ssh.WindowError):
        ssh.parse_hosts(spec)


def test_host_names_are_kept_in_order_once():
    assert ssh.parse_hosts("gpu01, alice@gpu02.lab,gpu01,10.0.0.3,::1,") == [
        "gpu01", "alice@gpu02.lab", "10.0.0.3", "::1"]


def test_an_option_in_place_of_a_host_never_reaches_ssh(tmp_path):
    marker = tmp_path / "x"
    r = run_report("--ssh", f"-oProxyCommand=touch {marker}", "--since", "1h")
    assert r.returncode == 2 and "is not a host name" in r.stderr and r.stdout == ""
    assert not marker.exists()
    r = run_report("--ssh", "gpu01", "--ssh-option", f"-oProxyCommand=touch {marker}", "--format", "json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == 2
    r = run_report("--ssh", "gpu01", "--ssh-timeout", "soon")
    assert r.returncode == 2 and "--ssh-timeout" in r.stderr


def _args(*argv: str):
    args = make_parser().parse_args(["--ssh", "gpu01", *argv])
    return args, _options(args, 1_704_070_800_000)


def test_remote_command_carries_the_window_resolved_here():
    args, opts = _args("--since", "2h", "--until", "2024-01-01T01:00Z", "--active-threshold", "12.5",
                       "--held-threshold", "1GiB", "--gpu", "0", "--user", "bob", "--no-rollups", "--tz", "UTC")
    assert ssh.remote_argv(args, opts, DEFAULT_DB) == [
        "gua-report", "--format", "json", "--since", "2023-12-31T23:00:00Z", "--until", "2024-01-01T01:00:00Z",
        "--active-threshold", "12.5", "--held-threshold", "1073741824B", "--gpu", "0", "--user", "bob",
        "--no-rollups"]
    args, opts = _args("--db", "/srv/gua.db", "--ssh-command", "sudo -n -u gua '/opt/gua report'")
    argv = ssh.remote_argv(args, opts, DEFAULT_DB)
    assert argv[:4] == ["sudo", "-n", "-u", "gua"] and argv[4] == "/opt/gua report"
    assert argv[-2:] == ["--db", "/srv/gua.db"]


def test_ssh_argv_is_a_list_with_batch_mode_and_the_admins_options_first():
    argv = ssh.ssh_argv("gpu01", ["gua-report", "--user", "a b"], "/etc/cfg", ["ConnectTimeout=30"])
    assert argv == ["ssh", "-T", "-o", "BatchMode=yes", "-F", "/etc/cfg", "-o", "ConnectTimeout=30",
                    "-o", "ConnectTimeout=10", "--", "gpu01", "gua-report --user 'a b'"]


def test_the_quoted_remote_command_survives_a_posix_shell():
    words = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))",
             "it's", "$(id)", "`id`", "a b", "\"q\"", "\\", ";|&<>", "*", "~", "\u202e", "-x", ""]
    cmd = ssh.ssh_argv("h", words, None, [])[-1]
    out = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(out.stdout) == words[3:]


def _res(rc, out=b"", err="", **kw) -> ssh.SshResult:
    return ssh.SshResult("gpu09", rc, out, err, **kw)


def test_each_way_a_host_can_fail_is_a_line():
    to = ssh.to_host
    assert to(_res(255, err="ssh: Could not resolve hostname gpu09\n"), "gua-report", 120).status == UNREACHABLE
    h = to(_res(127, err="bash: line 1: gua-report: command not found\n"), "gua-report", 120)
    assert (h.status, h.reason) == (NO_GUA, "gua-report not found on the host (exit 127: bash: line 1: "
                                            "gua-report: command not found); install gua-report there or name "
                                            "it with --ssh-command")
    assert to(_res(126), "gua-report", 120).status == NO_GUA
    assert to(_res(-9), "gua-report", 120).reason == "killed by signal 9"
    assert to(_res(None, timed_out=True), "gua-report", 7.5).reason == "no answer within 7.5 s (--ssh-timeout)"
    assert "larger than" in to(_res(None, too_big=True), "gua-report", 1).reason
    h = to(_res(2, err="gua-report: error: unrecognized arguments: --held-threshold\n"), "gua-report", 1)
    assert (h.status, h.reason) == (FAILED, "gua-report exited 2 without a report: gua-report: error: "
                                            "unrecognized arguments: --held-threshold")
    h = to(_res(0, b"Welcome to gpu09!\n{}"), "gua-report", 1)
    assert h.status == FAILED and h.reason.startswith("exit 0, output is not a gua-report document (gpu09: not JSON")
    err = json.dumps({"format_version": 2, "error": {"code": 4, "message": "permission denied: join gua"}})
    h = to(_res(4, err.encode()), "gua-report", 1)
    assert (h.status, h.error_code, h.reason) == ("error", 4, "error 4: permission denied: join gua")
    assert to(_res(0, (err + err).encode()), "gua-report", 1).reason == "2 documents where one was expected"


def test_run_one_caps_output_and_keeps_the_deadline():
    py = sys.executable
    big = ssh.run_one("h", [py, "-c", "import sys; sys.stdout.write('x' * 100000)"], time.monotonic() + 30, cap=1000)
    assert big.too_big and big.returncode is None
    t = time.monotonic()
    slow = ssh.run_one("h", [py, "-c", "import time; time.sleep(30)"], time.monotonic() + 0.5)
    assert slow.timed_out and time.monotonic() - t < 10
    noisy = ssh.run_one("h", [py, "-c", "import sys; sys.stderr.write('e' * 100000 + '\\nlast words\\n')"],
                        time.monotonic() + 30)
    assert noisy.returncode == 0 and noisy.last_line() == "last words" and len(noisy.stderr) <= ssh.STDERR_KEEP
    gone = ssh.run_one("h", ["/nonexistent/ssh"], time.monotonic() + 30)
    assert gone.returncode is None and gone.stderr.startswith("cannot run /nonexistent/ssh")
    assert ssh.to_host(gone, "gua-report", 1).status == FAILED


def test_hosts_run_at_once():
    py = sys.executable
    jobs = [(f"h{n}", [py, "-c", "import time; time.sleep(1)"]) for n in range(8)]
    t = time.monotonic()
    results = ssh.run_all(jobs, 30)
    assert [r.host for r in results] == [f"h{n}" for n in range(8)] and all(r.returncode == 0 for r in results)
    assert time.monotonic() - t < 5
