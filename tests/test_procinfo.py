"""/proc lookups: start time, real uid, cgroup attribution, PID reuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gua_collector.procinfo import ProcReader, parse_cgroup_file, parse_real_uid, parse_stat_starttime, unit_from_cgroup

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0", "slurm:job_4242"),
        ("/slurm/uid_1001/job_77/step_batch", "slurm:job_77"),
        ("/system.slice/docker-" + "ab12" * 16 + ".scope", "container:docker/" + ("ab12" * 16)[:12]),
        ("/machine.slice/libpod-" + "cd34" * 16 + ".scope/container", "container:podman/" + ("cd34" * 16)[:12]),
        ("/kubepods.slice/kubepods-burstable.slice/cri-containerd-" + "ef56" * 16 + ".scope", "container:containerd/" + ("ef56" * 16)[:12]),
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
