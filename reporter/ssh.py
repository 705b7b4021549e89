"""`gua-report --ssh HOST,...`: run this report on each host over the admin's ssh, and merge.

ssh is the fleet's reach (DESIGN.md): the admin's own `ssh` with their
config, keys and agent, in BatchMode (a host that would ask for a password
or a host key fails instead of hanging), every host at once under one
overall deadline. The window is resolved here, once, to absolute UTC
instants, so every host answers exactly the same question whatever its
clock or zone; thresholds go in canonical form for the same reason.

Nothing goes through a local shell: ssh gets an argv list, and host names
are checked so that none can be read as an ssh option. The remote side
does run the command through the user's shell, so each word of it is
quoted with shlex.quote. What comes back (stdout, ssh's and the remote
stderr) is untrusted: read up to a cap, parsed by merge.py's strict reader,
escaped on output.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .classify import Options
from .errors import Exit
from .merge import (
    FAILED,
    MAX_DOCUMENT_BYTES,
    NO_GUA,
    UNREACHABLE,
    BadDocument,
    Host,
    exit_code,
    fail,
    hosts_from_bytes,
    merge,
    render,
    write,
)
from .window import WindowError, iso_utc, parse_duration_ms

DEFAULT_COMMAND = "gua-report"
DEFAULT_CONNECT_TIMEOUT_S = 10
DEFAULT_TIMEOUT = "120s"
MAX_HOSTS = 1000
MAX_PARALLEL = 32  # ssh processes at once; more hosts wait for a slot (same deadline)
STDERR_KEEP = 8192  # the tail of a host's stderr kept for its line
# An ssh destination: [user@]host, a name, an IPv4 or a bare IPv6 address.
# No leading '-' (an option to ssh), no space, quote or shell metacharacter.
_HOST = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:%+-]*(@[A-Za-z0-9_:][A-Za-z0-9_.:%-]*)?")
# An ssh -o option: Keyword=value or "Keyword value", as ssh_config(5) writes them.
_SSH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9]*(=|\s+)\S.*")


def parse_hosts(text: str) -> list[str]:
    """'gpu01,gpu02, alice@gpu03' -> the hosts, in order, each once; WindowError (exit 2) if one is not a name."""
    hosts: list[str] = []
    for word in text.split(","):
        host = word.strip()
        if not host:
            continue
        if len(host) > 255 or not _HOST.fullmatch(host):
            raise WindowError(f"argument --ssh: {host!r} is not a host name ([user@]host: letters, digits, "
                              "'.', '-', '_', ':'; not starting with '-')")
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise WindowError("argument --ssh: no host given (--ssh gpu01,gpu02)")
    if len(hosts) > MAX_HOSTS:
        raise WindowError(f"argument --ssh: {len(hosts)} hosts; at most {MAX_HOSTS} at once")
    return hosts


def remote_argv(args: argparse.Namespace, opts: Options, default_db: str) -> list[str]:
    """The gua-report command each host runs: the same window and rules, as JSON."""
    try:
        words = shlex.split(args.ssh_command)
    except ValueError as exc:
        raise WindowError(f"argument --ssh-command: {exc}") from None
    if not words:
        raise WindowError("argument --ssh-command: empty")
    argv = [*words, "--format", "json",
            "--since", iso_utc(opts.since_ms), "--until", iso_utc(opts.until_ms),
            "--active-threshold", f"{opts.active_pm / 10:g}", "--held-threshold", f"{opts.held_bytes}B"]
    for g in opts.gpus:
        argv += ["--gpu", g]
    for u in opts.users:
        argv += ["--user", u]
    if not opts.use_rollups:
        argv.append("--no-rollups")
    if args.db != default_db:
        argv += ["--db", args.db]
    return argv


def ssh_argv(host: str, remote: Sequence[str], config: str | None, options: Sequence[str]) -> list[str]:
    """ssh's argv for one host. ssh keeps the first value it gets for an option:
    BatchMode comes first (a prompt would hang every host), the admin's
    -o options next, our ConnectTimeout default last, so theirs win."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes"]
    if config:
        argv += ["-F", config]
    for o in options:
        argv += ["-o", o]
    argv += ["-o", f"ConnectTimeout={DEFAULT_CONNECT_TIMEOUT_S}", "--", host,
             " ".join(shlex.quote(w) for w in remote)]
    return argv


@dataclass(frozen=True)
class SshResult:
    host: str
    returncode: int | None  # None: not run, or killed by us (timed_out / too_big)
    stdout: bytes
    stderr: str
    timed_out: bool = False
    too_big: bool = False

    def last_line(self) -> str:
        """The last non-empty line of stderr: what ssh or the remote shell said last."""
        lines = [x.strip() for x in self.stderr.splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""


def _collect(proc: subprocess.Popen[bytes], deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """stdout (at most `cap` bytes) and the tail of stderr, until both close or the deadline."""
    out, err = bytearray(), bytearray()
    timed_out = too_big = False
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map() and not (timed_out or too_big):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk
                if buf is out and len(out) > cap:
                    too_big = True
                elif buf is err and len(err) > STDERR_KEEP:
                    del err[:-STDERR_KEEP]
    return bytes(out), bytes(err), timed_out, too_big


def run_one(host: str, argv: Sequence[str], deadline: float, cap: int = MAX_DOCUMENT_BYTES) -> SshResult:
    if time.monotonic() >= deadline:
        return SshResult(host, None, b"", "", timed_out=True)
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:  # no ssh client installed
        return SshResult(host, None, b"", f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        out, err, timed_out, too_big = _collect(proc, deadline, cap)
        if timed_out or too_big:
            proc.kill()
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        rc = proc.wait()
    return SshResult(host, None if timed_out or too_big else rc, out, err.decode("utf-8", "replace"),
                     timed_out, too_big)


def run_all(jobs: Sequence[tuple[str, list[str]]], timeout_s: float) -> list[SshResult]:
    """Every host's ssh at once (up to MAX_PARALLEL), one deadline for all; results in input order."""
    deadline = time.monotonic() + timeout_s
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(jobs)))) as pool:
        futures = [pool.submit(run_one, host, argv, deadline) for host, argv in jobs]
        return [f.result() for f in futures]


def to_host(res: SshResult, command: str, timeout_s: float) -> Host:
    """One host's ssh outcome -> its line: merged later, or a reason why not."""
    said = res.last_line()
    if res.timed_out:
        return Host(res.host, "ssh", FAILED, f"no answer within {timeout_s:g} s (--ssh-timeout)")
    if res.too_big:
        return Host(res.host, "ssh", FAILED, f"output larger than {MAX_DOCUMENT_BYTES // 2**20} MiB")
    rc = res.returncode
    if rc is None:
        return Host(res.host, "ssh", FAILED, said or "ssh could not be run")
    if rc == 255:  # ssh's own failure: DNS, refused, timeout, host key, authentication
        return Host(res.host, "ssh", UNREACHABLE, said or "ssh failed (exit 255)")
    if rc in (126, 127):  # the remote shell found no such program, or cannot run it
        return Host(res.host, "ssh", NO_GUA,
                    f"{command} {'not found' if rc == 127 else 'cannot be run'} on the host (exit {rc}"
                    + (f": {said}" if said else "") + "); install gua-report there or name it with "
                    "--ssh-command")
    if rc < 0:
        return Host(res.host, "ssh", FAILED, f"killed by signal {-rc}" + (f": {said}" if said else ""))
    try:
        hosts = hosts_from_bytes(res.stdout, res.host, "ssh", label=res.host) if res.stdout.strip() else []
    except BadDocument as exc:
        return Host(res.host, "ssh", FAILED, f"exit {rc}, output is not a gua-report document ({exc})")
    if len(hosts) != 1:
        why = f": {said}" if said else ""
        return Host(res.host, "ssh", FAILED, f"{command} exited {rc} without a report{why}"
                    if not hosts else f"{len(hosts)} documents where one was expected")
    return hosts[0]


def _timeout_s(text: str) -> float:
    try:
        ms = parse_duration_ms(text)
    except WindowError as exc:
        raise WindowError(f"argument --ssh-timeout: {exc}") from None
    if not ms:
        raise WindowError(f"argument --ssh-timeout: {text!r} is not a duration (30s, 2m)")
    return ms / 1000


def _check_ssh_args(args: argparse.Namespace) -> None:
    for o in args.ssh_option:
        if not _SSH_OPTION.fullmatch(o) or "\n" in o or "\0" in o:
            raise WindowError(f"argument --ssh-option: {o!r} is not an ssh option (Keyword=value, "
                              "as in ssh_config(5))")
    if args.ssh_config is not None and not os.path.isfile(args.ssh_config):
        raise WindowError(f"argument --ssh-config: {args.ssh_config} is not a file")


def run(args: argparse.Namespace, options: Callable[[argparse.Namespace, int], Options], now_ms: int,
        default_db: str) -> int:
    """`gua-report --ssh HOSTS ...`; `options` is the report's own option reader (cli._options)."""
    fmt = args.format
    try:
        hosts = parse_hosts(args.ssh)
        opts = options(args, now_ms)
        timeout_s = _timeout_s(args.ssh_timeout)
        _check_ssh_args(args)
        remote = remote_argv(args, opts, default_db)
    except WindowError as exc:
        return fail(int(Exit.BAD_ARGS), str(exc), fmt, prog="gua-report")
    jobs = [(h, ssh_argv(h, remote, args.ssh_config, args.ssh_option)) for h in hosts]
    results = run_all(jobs, timeout_s)
    fleet = merge([to_host(r, args.ssh_command, timeout_s) for r in results])
    write(render(fleet, fmt, opts.tz, opts.tz_name))
    return exit_code(fleet)
