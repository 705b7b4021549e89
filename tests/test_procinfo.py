"""/proc lookups: start time, real uid, cgroup attribution, PID reuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gua_collector.procinfo import (
    ProcReader,
    parse_cgroup_file,
    parse_real_uid,
    parse_stat_starttime,
    proc_hidden,
    unit_from_cgroup,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0", "slurm:job_4242"),
        ("/slurm/uid_1001/job_77/step_batch", "slurm:job_77"),
        ("/system.slice/docker-" + "ab12" * 16 + ".scope", "container:docker/" + ("ab12" * 16)[:12]),
        ("/machine.slice/libpod-" + "cd34" * 16 + ".scope/container", "container:podman/" + ("cd34" * 16)[:12]),
        # kubelet puts each container under its pod's slice (attribution matches only real layouts).
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + "1a2b" * 8
         + ".slice/cri-containerd-" + "ef56" * 16 + ".scope", "container:containerd/" + ("ef56" * 16)[:12]),
        ("/system.slice/jupyterhub.service", "unit:jupyterhub.service"),
        ("/system.slice/gpu.slice/trainer.service/worker", "unit:trainer.service"),
        ("/user.slice/user-1001.slice/session-3.scope", ""),
        ("/", ""),
    ],
)
def test_unit_from_cgroup(path: str, unit: str) -> None:
    assert unit_from_cgroup(path) == unit


def test_parse_cgroup_v2_and_v1() -> None:
    assert parse_cgroup_file("0::/system.slice/a.service\n") == "/system.slice/a.service"
    v1 = "12:memory:/user.slice\n1:name=systemd:/system.slice/b.service\n"
    assert parse_cgroup_file(v1) == "/system.slice/b.service"


def test_parse_stat_with_hostile_comm() -> None:
    # comm may contain spaces and parentheses; field 22 is counted after the last ')'.
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["123456", "0"]
    text = "4242 (evil ) name) " + " ".join(fields)
    assert parse_stat_starttime(text) == 123456


def test_parse_real_uid() -> None:
    assert parse_real_uid("Name:\tpython\nUid:\t1001\t0\t0\t0\n") == 1001


def fake_proc(root: Path, pid: int, start: int, uid: int, comm: str, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start), "0"]
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields))
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_reader_identity_and_pid_reuse(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    names = {1001: "alice", 1002: "bob"}
    reader = ProcReader(str(tmp_path), username_of=lambda uid: names.get(uid, f"uid:{uid}"))
    hz = os.sysconf("SC_CLK_TCK")
    fake_proc(tmp_path, 500, 10 * hz, 1001, "python", "/system.slice/slurmstepd.scope/job_9/step_0")
    first = reader.lookup(500)
    assert first is not None
    assert (first.username, first.comm, first.unit) == ("alice", "python", "slurm:job_9")
    assert first.start_ms == 1_700_000_010_000
    # The pid is reused by someone else: a new start time makes it a new process.
    fake_proc(tmp_path, 500, 99 * hz, 1002, "bash", "/user.slice/user-1002.slice")
    second = reader.lookup(500)
    assert second is not None and second.username == "bob" and second.start_ms != first.start_ms
    fake_proc(tmp_path, 501, 5 * hz, 4242, "ghost", "/")
    assert reader.lookup(501).username == "uid:4242"
    assert reader.lookup(999) is None, "a pid that is gone is not a process"


PROC_LINE = "22 26 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc {opts}\n"
ROOT_LINE = "26 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"


@pytest.mark.parametrize(
    "opts, groups, hidden",
    [
        ("rw", {0}, False),
        ("rw,hidepid=invisible", {0}, True),
        ("rw,hidepid=2", {0}, True),
        ("rw,hidepid=2,gid=998", {998}, False),
        ("rw,hidepid=2,gid=998", {1000}, True),
        ("rw,hidepid=0", {0}, False),
    ],
)
def test_proc_hidden(opts: str, groups: set[int], hidden: bool) -> None:
    text = proc_hidden(ROOT_LINE + PROC_LINE.format(opts=opts), groups)
    assert bool(text) is hidden
    if hidden:
        assert "hidepid" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every /proc file; the unreadable case needs a normal user")
def test_unreadable_process_kept_as_unknown(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("btime 1700000000\n")
    fake_proc(tmp_path, 700, 5, 1001, "python", "/")
    (tmp_path / "700" / "status").chmod(0)
    info = ProcReader(str(tmp_path)).lookup(700)
    assert info is not None and info.username == "unknown" and info.uid is None


def test_unreadable_process_kept_as_unknown_as_nobody(tmp_path: Path, shared_dir: str) -> None:
    """The same for real when the tests run as root: read the fake /proc as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user (covered by the non-root test)")
    import subprocess
    import sys

    root = Path(shared_dir)
    (root / "stat").write_text("btime 1700000000\n")
    fake_proc(root, 700, 5, 1001, "python", "/")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "700" / "status").chmod(0o600)
    code = (
        "from gua_collector.procinfo import ProcReader;"
        f"i = ProcReader({str(root)!r}).lookup(700); print(i.username, i.uid, i.start_ms)"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.split() == ["unknown", "None", "0"], out.stderr
