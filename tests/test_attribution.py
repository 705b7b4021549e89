"""Attribution: labels come only from cgroups that the real managers create."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gua_collector.attribution import (
    CgroupPaths,
    hierarchy_layout,
    label,
    label_path,
    split_cgroup_file,
)
from gua_collector.procinfo import ProcReader

pytestmark = pytest.mark.timeout(30)

CID = "4f2a9c1be07d" + "3" * 52  # a 64-hex container id
CID12 = CID[:12]
POD = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"  # a pod UID
POD_ = POD.replace("-", "_")  # as kubelet writes it in slice names
PODMAN_POD = "d" * 64
SLUID = "sEKNKTV3WPV500"  # Slurm 26.05's job-level cgroup name (cgroup.conf(5) example)
USER = "/user.slice/user-1002.slice/user@1002.service"  # user 1002's delegated subtree

PRIVILEGED = ("slurm:", "container:", "unit:")

# Paths, one per layout a root-run manager creates, and the label each gets.
REAL = [
    # Slurm, cgroup/v2 plugin: the stepd scope in CgroupSlice (default system.slice).
    ("/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0", "slurm:job_4242"),
    ("/system.slice/slurmstepd.scope/job_4242/step_batch/user/task_0", "slurm:job_4242"),
    ("/system.slice/slurmstepd.scope/job_4242/step_extern/user/task_special", "slurm:job_4242"),
    ("/system.slice/node17_slurmstepd.scope/job_77/step_0/user/task_3", "slurm:job_77"),  # multiple-slurmd
    ("/slurm.slice/slurmstepd.scope/job_9/step_0/user/task_0", "slurm:job_9"),  # CgroupSlice=slurm.slice
    (f"/system.slice/slurmstepd.scope/{SLUID}/step_0/user/task_0", f"slurm:{SLUID}"),
    # Slurm, cgroup/v1 plugin: CgroupPrepend /slurm, or /slurm_<node> with multiple-slurmd.
    ("/slurm/uid_1000/job_4242/step_0/task_0", "slurm:job_4242"),
    ("/slurm_node3/uid_1000/job_4242/step_batch", "slurm:job_4242"),
    # Docker: systemd driver, cgroupfs driver.
    (f"/system.slice/docker-{CID}.scope", f"container:docker/{CID12}"),
    (f"/docker/{CID}", f"container:docker/{CID12}"),
    # Rootful podman: systemd manager (crun adds "container"), in a pod, cgroupfs manager.
    (f"/machine.slice/libpod-{CID}.scope", f"container:podman/{CID12}"),
    (f"/machine.slice/libpod-{CID}.scope/container", f"container:podman/{CID12}"),
    (f"/machine.slice/machine-libpod_pod_{PODMAN_POD}.slice/libpod-{CID}.scope/container", f"container:podman/{CID12}"),
    (f"/libpod_parent/libpod-{CID}", f"container:podman/{CID12}"),
    (f"/libpod_parent/{PODMAN_POD}/libpod-{CID}", f"container:podman/{CID12}"),
    # Kubernetes, systemd driver: burstable, besteffort, guaranteed pods.
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/cri-containerd-{CID}.scope",
        f"container:containerd/{CID12}",
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/crio-{CID}.scope/container",
        f"container:crio/{CID12}",
    ),
    (f"/kubepods.slice/kubepods-pod{POD_}.slice/docker-{CID}.scope", f"container:docker/{CID12}"),
    # Kubernetes, cgroupfs driver: bare id (containerd, docker) or crio-<id>.
    (f"/kubepods/burstable/pod{POD}/{CID}", f"container:kubepods/{CID12}"),
    (f"/kubepods/pod{POD}/crio-{CID}", f"container:crio/{CID12}"),
    # System services, in nested slices too.
    ("/system.slice/jupyterhub.service", "unit:jupyterhub.service"),
    ("/system.slice/gpu.slice/trainer.service/worker", "unit:trainer.service"),
    ("/system.slice/system-getty.slice/getty@tty1.service", "unit:getty@tty1.service"),
    ("/system.slice/slurmd.service", "unit:slurmd.service"),
    ("/system.slice/containerd.service", "unit:containerd.service"),  # shims, and `ctr run` without a cgroup
    # Root-made, but no job, container or service.
    ("/system.slice/slurmstepd.scope/system", ""),
    ("/slurm/uid_1000", ""),
    (f"/machine.slice/libpod-conmon-{CID}.scope", ""),
    (f"/kubepods.slice/kubepods-pod{POD_}.slice/crio-conmon-{CID}.scope", ""),
    ("/user.slice/user-1001.slice/session-3.scope", ""),
    ("/init.scope", ""),
    ("/", ""),
]


@pytest.mark.parametrize("path, expected", REAL)
def test_real_layouts(path: str, expected: str) -> None:
    assert label_path(path) == expected


# Rootless containers: recognised, and labelled as the user's own.
ROOTLESS = [
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container",
     f"user:1000/container:podman/{CID12}"),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/user-libpod_pod_{PODMAN_POD}.slice/libpod-{CID}.scope",
     f"user:1000/container:podman/{CID12}"),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{CID}.scope",
     f"user:1000/container:docker/{CID12}"),
    # Root's own user manager is a user manager like any other (podman run from root's session).
    (f"/user.slice/user-0.slice/user@0.service/machine.slice/libpod-{CID}.scope/container",
     f"user:0/container:podman/{CID12}"),
    # The user's own tree, nothing recognised.
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1.scope", ""),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-conmon-{CID}.scope", ""),
]


@pytest.mark.parametrize("path, expected", ROOTLESS)
def test_rootless_containers_are_the_users_own(path: str, expected: str) -> None:
    assert label_path(path) == expected


# What a user can create in its own subtree to look like someone else.
FAKES = [
    f"{USER}/app.slice/slurm/job_4242",
    f"{USER}/app.slice/slurmstepd.scope/job_4242/step_0/user/task_0",
    f"{USER}/system.slice/slurmstepd.scope/job_4242/step_0",
    f"{USER}/slurm/uid_1000/job_4242/step_0/task_0",
    f"{USER}/app.slice/docker-{CID}.scope",
    f"{USER}/docker/{CID}",
    f"{USER}/system.slice/docker-{CID}.scope",
    f"{USER}/machine.slice/libpod-{CID}.scope",
    f"{USER}/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{CID}.scope",
    f"{USER}/kubepods/burstable/pod{POD}/{CID}",
    f"{USER}/system.slice/evil.service",
    f"{USER}/app.slice/x/system.slice/trainer.service",
    # Names with the bytes a directory name may hold.
    f"{USER}/app.slice/x\n0::/system.slice/slurmstepd.scope/job_1",
    f"{USER}/app.slice/../../../../system.slice/slurmstepd.scope/job_1",
    f"{USER}/ /system.slice/docker-{CID}.scope",
]


@pytest.mark.parametrize("path", FAKES)
def test_user_subtree_never_gets_a_privileged_label(path: str) -> None:
    assert not label_path(path).startswith(PRIVILEGED)


@pytest.mark.parametrize("path", [p for p, want in REAL if want])
@pytest.mark.parametrize("under", [USER, f"{USER}/app.slice", f"{USER}/user.slice", "/user.slice/user-1002.slice"])
def test_every_real_layout_replanted_in_a_user_tree_loses_its_authority(path: str, under: str) -> None:
    assert not label_path(under + path).startswith(PRIVILEGED)


@pytest.mark.parametrize(
    "path",
    [
        "/system.slice /slurmstepd.scope/job_1",  # a space
        "/system.slice/slurmstepd.scope/job_\u0664\u0662",  # Arabic-Indic digits
        "/system.slice/slurmstepd.scope/job_1\n",
        "/system.slice/slurmstepd.scope/slurm_job_1",
        f"/system.slice/docker-{CID[:12]}.scope",  # docker names cgroups by the full id
        f"/system.slice/docker-{CID.upper()}.scope",
        f"/system.slice/libpod-{CID}.scope",  # podman's scope where podman does not put it
        f"/kubepods.slice/kubepods-burstable.slice/cri-containerd-{CID}.scope",  # no pod slice
        "/../../system.slice/slurmstepd.scope/job_1",  # outside our cgroup namespace
        "system.slice/slurmstepd.scope/job_1",  # not absolute
        "/user.slice/slurmstepd.scope/job_1",
    ],
)
def test_near_misses_get_nothing(path: str) -> None:
    assert label_path(path) == ""


@pytest.mark.parametrize(
    "manager",
    [
        "user@1002.service",  # another user's uid
        "user@01000.service",
        "user@.service",
    ],
)
def test_user_manager_must_belong_to_its_slice(manager: str) -> None:
    path = f"/user.slice/user-1000.slice/{manager}/user.slice/libpod-{CID}.scope"
    assert label_path(path) == ""


def v1_file(controller_path: str, systemd_path: str, named: str = "/") -> str:
    """A cgroup v1 /proc/PID/cgroup: Slurm and docker put a task in every controller."""
    return (
        f"11:devices:{controller_path}\n"
        f"10:memory:{controller_path}\n"
        f"9:pids:/system.slice/slurmd.service\n"
        f"8:cpuset:{controller_path}\n"
        f"7:freezer:{controller_path}\n"
        f"6:cpu,cpuacct:{controller_path}\n"
        f"2:name=elogind:{named}\n"
        f"1:name=systemd:{systemd_path}\n"
    )


V1_LAYOUT = ((11, "devices"), (10, "memory"), (9, "pids"), (8, "cpuset"), (7, "freezer"),
             (6, "cpu,cpuacct"), (2, "name=elogind"), (1, "name=systemd"))


@pytest.mark.parametrize("layout", [None, V1_LAYOUT])
def test_v1_slurm_job_seen_in_controllers(layout: tuple[tuple[int, str], ...] | None) -> None:
    # The job's tasks stay in slurmd.service in name=systemd; the job is in the controllers.
    text = v1_file("/slurm/uid_1000/job_4242/step_0/task_0", "/system.slice/slurmd.service")
    paths = split_cgroup_file(text, layout)
    assert paths is not None
    assert paths.shown == "/system.slice/slurmd.service"
    assert label(paths) == "slurm:job_4242"


def test_v1_adopted_ssh_session_is_the_job() -> None:
    # pam_slurm_adopt moves an ssh session's processes into the job's controller cgroups.
    text = v1_file("/slurm_node3/uid_1000/job_9/step_extern", "/user.slice/user-1000.slice/session-5.scope")
    paths = split_cgroup_file(text)
    assert paths is not None and label(paths) == "slurm:job_9"


def test_v1_docker_and_named_hierarchies() -> None:
    paths = split_cgroup_file(v1_file(f"/docker/{CID}", f"/docker/{CID}"))
    assert paths is not None and label(paths) == f"container:docker/{CID12}"
    # Only name=systemd counts among named hierarchies; others carry no manager we know.
    paths = split_cgroup_file(v1_file("/", "/user.slice/user-1002.slice/session-2.scope", named="/slurm/uid_1002/job_1"))
    assert paths is not None and not label(paths).startswith("slurm:")


def test_v1_without_systemd_shows_the_first_real_controller_path() -> None:
    paths = split_cgroup_file("3:memory:/\n2:cpuset:/docker/x\n1:freezer:/\n")
    assert paths is not None and paths.shown == "/docker/x"


def test_a_job_beats_the_service_and_the_users_own_claim() -> None:
    own = f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"
    paths = CgroupPaths(unified=own, systemd="/system.slice/slurmd.service",
                        controllers=("/slurm/uid_1000/job_5/step_0",))
    assert label(paths) == "slurm:job_5"
    assert label(CgroupPaths(unified=own, controllers=("/",))) == f"user:1000/container:podman/{CID12}"


HYBRID = (
    "12:pids:/user.slice/user-1002.slice/user@1002.service\n"
    "4:memory:/user.slice/user-1002.slice/user@1002.service\n"
    "1:name=systemd:{path}\n"
    "0::{path}\n"
)
HYBRID_LAYOUT = ((12, "pids"), (4, "memory"), (1, "name=systemd"), (0, ""))
FORGED_JOB = "x\n0::/system.slice/slurmstepd.scope/job_1"


@pytest.mark.parametrize(
    "text, layout",
    [
        # Pure v2: a newline in a name forges a second v2 line.
        (f"0::{USER}/app.slice/{FORGED_JOB}\n", None),
        (f"0::{USER}/app.slice/{FORGED_JOB}\n", ((0, ""),)),
        # Hybrid: forged lines after name=systemd, before the real v2 line.
        (HYBRID.format(path=f"{USER}/app.slice/{FORGED_JOB}"), HYBRID_LAYOUT),
        (HYBRID.format(path=f"{USER}/app.slice/{FORGED_JOB}"), None),
        # Pure v1: a forged v2 line after the last real line, with and without the layout.
        (v1_file("/", f"{USER}/app.slice/{FORGED_JOB}"), V1_LAYOUT),
        (v1_file("/", f"{USER}/app.slice/{FORGED_JOB}"), None),
        # Pure v1: a forged controller line out of the kernel's order.
        (v1_file("/", f"{USER}/x\n5:freezer:/slurm/uid_1002/job_1"), None),
        (v1_file("/", f"{USER}/x\n5:freezer:/slurm/uid_1002/job_1"), V1_LAYOUT),
    ],
)
def test_forged_lines_give_no_path_and_no_label(text: str, layout: tuple[tuple[int, str], ...] | None) -> None:
    assert split_cgroup_file(text, layout) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "garbage\n",
        "0::relative/path\n",
        "x::/system.slice/slurmstepd.scope/job_1\n",
        "0::/a\n\n",
        "0:/system.slice/slurmstepd.scope/job_1\n",
        "3:cpuset:/\n3:memory:/slurm/uid_1/job_1\n",  # one hierarchy twice
        "0:cpuset:/slurm/uid_1/job_1\n",  # v2 carries no controller list
        "3::/slurm/uid_1/job_1\n",  # and every v1 hierarchy does
    ],
)
def test_malformed_files(text: str) -> None:
    assert split_cgroup_file(text) is None


def test_only_newline_splits_lines() -> None:
    # \r, \v and U+2028 are bytes of a directory name, not line ends.
    for sep in ("\r", "\x0b", "\u2028", "\x85"):
        text = f"0::{USER}/app.slice/x{sep}0::/system.slice/slurmstepd.scope/job_1\n"
        paths = split_cgroup_file(text, ((0, ""),))
        assert paths is not None
        assert paths.shown == f"{USER}/app.slice/x{sep}0::/system.slice/slurmstepd.scope/job_1"
        assert label(paths) == ""


def test_hybrid_host_with_its_layout() -> None:
    path = f"/system.slice/docker-{CID}.scope"
    paths = split_cgroup_file(HYBRID.format(path=path), HYBRID_LAYOUT)
    assert paths is not None and paths.shown == path and label(paths) == f"container:docker/{CID12}"


def test_layout_from_own_file() -> None:
    own = HYBRID.format(path="/system.slice/gua.service")
    assert hierarchy_layout(own) == HYBRID_LAYOUT
    assert hierarchy_layout("garbage\n") is None
    assert hierarchy_layout("3:cpuset:/\n3:memory:/\n") is None


def write_proc(root: Path, pid: int, cgroup_text: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + ["100", "0"]
    (d / "stat").write_text(f"{pid} (python) " + " ".join(fields))
    (d / "status").write_text("Name:\tpython\nUid:\t1002\t1002\t1002\t1002\n")
    (d / "comm").write_text("python\n")
    (d / "cgroup").write_text(cgroup_text)


def reader(root: Path, own_cgroup: str | None) -> ProcReader:
    (root / "stat").write_text("btime 1700000000\n")
    if own_cgroup is not None:
        (root / "self").mkdir(exist_ok=True)
        (root / "self" / "cgroup").write_text(own_cgroup)
    return ProcReader(str(root), username_of=lambda uid: f"u{uid}")


def test_reader_attributes_a_v1_job_and_shows_the_systemd_path(tmp_path: Path) -> None:
    procs = reader(tmp_path, v1_file("/", "/system.slice/gua.service"))
    write_proc(tmp_path, 10, v1_file("/slurm/uid_1002/job_31/step_0/task_0", "/system.slice/slurmd.service"))
    info = procs.lookup(10)
    assert info is not None
    assert (info.cgroup, info.unit) == ("/system.slice/slurmd.service", "slurm:job_31")


@pytest.mark.parametrize("own", [None, "0::/system.slice/gua.service\n"])
def test_reader_gives_a_forged_file_no_path_and_no_label(tmp_path: Path, own: str | None) -> None:
    procs = reader(tmp_path, own)
    write_proc(tmp_path, 11, f"0::{USER}/app.slice/{FORGED_JOB}\n")
    info = procs.lookup(11)
    assert info is not None and info.username == "u1002"
    assert (info.cgroup, info.unit) == ("", "")


def test_reader_on_a_hybrid_host_uses_the_hosts_layout(tmp_path: Path) -> None:
    procs = reader(tmp_path, HYBRID.format(path="/system.slice/gua.service"))
    write_proc(tmp_path, 12, HYBRID.format(path=f"/machine.slice/libpod-{CID}.scope/container"))
    write_proc(tmp_path, 13, HYBRID.format(path=f"{USER}/app.slice/{FORGED_JOB}"))
    first, second = procs.lookup(12), procs.lookup(13)
    assert first is not None and first.unit == f"container:podman/{CID12}"
    assert second is not None and (second.cgroup, second.unit) == ("", "")


@pytest.mark.skipif(not os.path.exists("/proc/self/cgroup"), reason="needs a Linux /proc")
def test_this_hosts_own_file_is_accepted_with_its_own_layout() -> None:
    text = Path("/proc/self/cgroup").read_text()
    assert split_cgroup_file(text, hierarchy_layout(text)) is not None
    # The order the no-layout fallback relies on: strictly decreasing ids, v2 last.
    ids = [int(line.split(":", 1)[0]) for line in text.split("\n") if line]
    assert all(a > b for a, b in zip(ids, ids[1:]))
