"""Who launched a process, from its cgroups: a label that a local user cannot fake.

Admins act on these labels (they ask a user to free a GPU, they kill a job),
so a label may name only a party that really placed the process where it is.
Any local user controls the cgroup paths below the subtree systemd delegates
to it (``/user.slice/user-UID.slice/user@UID.service/...``) and may put any
byte except '/' and NUL in a directory name there, newlines included. Hence:

- every rule is anchored at the root of the path and matches whole path
  components, at places that only root-run managers (slurmd/slurmstepd,
  dockerd, containerd, CRI-O, podman, systemd) can create;
- anything under a user's own ``user@UID.service`` gets at most a
  ``user:UID/...`` label: the user's own claim, with no authority;
- a /proc/PID/cgroup file that cannot be split into exactly one line per
  hierarchy (a directory name holds a newline and so forges lines) gets no
  path and no label at all.

Label grammar (the ``unit`` column of the ``process`` table)::

    label     = "" | slurm | container | unit | own
    slurm     = "slurm:job_" JOBID | "slurm:" SLUID
    container = "container:" RUNTIME "/" ID12
    unit      = "unit:" NAME ".service"
    own       = "user:" UID "/container:" RUNTIME "/" ID12
    RUNTIME   = "docker" | "podman" | "containerd" | "crio" | "kubepods"

``kubepods`` stands for a Kubernetes container whose runtime the cgroupfs
layout does not tell. ID12 is the first 12 hex digits of the container id.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType

# (hierarchy id, controllers) of each line of a /proc/PID/cgroup file, in order.
Layout = tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class CgroupPaths:
    """Where one process sits in each cgroup hierarchy, as /proc/PID/cgroup lists it."""

    unified: str | None = None  # the cgroup v2 path (the "0::" line); None when v2 is not mounted
    systemd: str | None = None  # the v1 "name=systemd" path (legacy and hybrid hosts)
    # The v1 controller hierarchies (cpuset, memory, freezer, devices, ...), in
    # file order. On a v1 host a Slurm job is visible only here.
    controllers: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        """The one path shown to admins: v2, else name=systemd, else the first v1 controller's."""
        if self.unified is not None:
            return self.unified
        if self.systemd is not None:
            return self.systemd
        return next((p for p in self.controllers if p not in ("", "/")), "")

    def every(self) -> tuple[str, ...]:
        """All the paths, the shown one first."""
        first = tuple(p for p in (self.unified, self.systemd) if p is not None)
        return first + self.controllers


@dataclass(frozen=True)
class _Line:
    hierarchy: int
    controllers: str
    path: str


# The kernel writes "ID:CONTROLLERS:PATH"; PATH starts with '/' (also "/.."
# outside our cgroup namespace) and may hold ':' and any other byte but '/'.
_LINE = re.compile(r"([0-9]{1,10}):([^:\n]*):(/[^\n]*)", re.ASCII)


def _lines(text: str) -> tuple[_Line, ...] | None:
    """The lines of a /proc/PID/cgroup file, or None if one is not ID:CONTROLLERS:PATH."""
    # Split on '\n' only: the kernel ends lines with '\n' and prints paths
    # raw, so '\r', '\v', U+2028 and the like (which str.splitlines() would
    # also split on) are bytes of a directory name.
    raw = text.split("\n")
    if raw[-1] == "":
        raw.pop()
    lines = []
    for line in raw:
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        lines.append(_Line(int(match[1]), match[2], match[3]))
    return tuple(lines) if lines else None


def hierarchy_layout(own_cgroup_file: str) -> Layout | None:
    """The host's hierarchies, from the collector's own /proc/self/cgroup (a root-made cgroup).

    Every process lists the same hierarchies in the same order, so a file with
    any other sequence of (id, controllers) has lines forged by a newline in a
    directory name.
    """
    lines = _lines(own_cgroup_file)
    if lines is None:
        return None
    layout = tuple((line.hierarchy, line.controllers) for line in lines)
    return layout if len({h for h, _ in layout}) == len(layout) else None


def _ordered(lines: tuple[_Line, ...]) -> bool:
    """Whether lines could be the kernel's own, when the host's layout is unknown.

    The kernel lists v1 hierarchies newest first (strictly decreasing ids) and
    the v2 one ("0::") last. A forged line would have to fit that order right
    after the line whose name holds the newline. A v2 line after v1 lines is
    refused too: on a pure v1 host that is exactly what a newline in a
    name=systemd directory name forges, and without the layout a real hybrid
    host cannot be told apart from it.
    """
    ids = [line.hierarchy for line in lines]
    if any(a <= b for a, b in pairwise(ids)):
        return False
    if any((line.hierarchy == 0) != (line.controllers == "") for line in lines):
        return False
    return ids[-1] != 0 or len(ids) == 1


def split_cgroup_file(text: str, layout: Layout | None = None) -> CgroupPaths | None:
    """The paths of a /proc/PID/cgroup file; None when its lines cannot be told apart.

    layout is the host's (see hierarchy_layout); without it the file must pass
    the kernel's ordering rules, which a pure v1 or pure v2 host always does.
    """
    lines = _lines(text)
    if lines is None:
        return None
    if layout is not None:
        if tuple((line.hierarchy, line.controllers) for line in lines) != layout:
            return None
    elif not _ordered(lines):
        return None
    unified = next((line.path for line in lines if line.hierarchy == 0), None)
    systemd = next((line.path for line in lines if line.controllers == "name=systemd"), None)
    # Named hierarchies other than systemd's carry no controller and no manager we know.
    controllers = tuple(
        line.path for line in lines if line.hierarchy != 0 and not line.controllers.startswith("name=")
    )
    return CgroupPaths(unified, systemd, controllers)


def _c(pattern: str) -> re.Pattern[str]:
    # ASCII: [0-9] and friends must not match other scripts' digits.
    return re.compile(pattern, re.ASCII)


_ID = r"(?P<id>[0-9a-f]{64})"
_QOS = r"(?:burstable|besteffort)"
_POD_SYSTEMD = r"pod[0-9a-f_]{32,36}"  # kubelet writes the pod UID's '-' as '_' in slice names
_POD_CGROUPFS = r"pod[0-9a-f-]{32,36}"
# Container cgroups a CRI runtime makes under a pod slice (systemd driver).
_KUBE_SCOPE = _c(rf"(?P<rt>cri-containerd|crio|docker)-{_ID}\.scope")
# The runtime a scope's name prefix stands for.
_RUNTIME = MappingProxyType(
    {"docker": "docker", "libpod": "podman", "cri-containerd": "containerd", "crio": "crio"}
)


@dataclass(frozen=True)
class _ContainerLayout:
    """The components, from the root, of the cgroup one manager makes for a container.

    The last component has an "id" group and may have an "rt" group (a name
    prefix in _RUNTIME); runtime is the label's runtime when it has none.
    """

    runtime: str
    components: tuple[re.Pattern[str], ...]


_CONTAINER_LAYOUTS = (
    # Docker, systemd cgroup driver (moby: cgroup parent "system.slice", prefix "docker").
    _ContainerLayout("docker", (_c(r"system\.slice"), _c(rf"docker-{_ID}\.scope"))),
    # Docker, cgroupfs driver (moby: default cgroup parent "/docker").
    _ContainerLayout("docker", (_c("docker"), _c(_ID))),
    # Rootful podman, systemd manager (libpod: SystemdDefaultCgroupParent "machine.slice"),
    # alone or in a pod's slice; crun adds a "container" child, which is below.
    _ContainerLayout("podman", (_c(r"machine\.slice"), _c(rf"libpod-{_ID}\.scope"))),
    _ContainerLayout(
        "podman",
        (_c(r"machine\.slice"), _c(r"machine-libpod_pod_[0-9a-f]{64}\.slice"), _c(rf"libpod-{_ID}\.scope")),
    ),
    # Rootful podman, cgroupfs manager (libpod: CgroupfsDefaultCgroupParent "/libpod_parent").
    _ContainerLayout("podman", (_c("libpod_parent"), _c(rf"libpod-{_ID}"))),
    _ContainerLayout("podman", (_c("libpod_parent"), _c("[0-9a-f]{64}"), _c(rf"libpod-{_ID}"))),
    # Kubernetes, systemd driver: burstable/besteffort pods, then guaranteed ones.
    _ContainerLayout(
        "kubepods",
        (_c(r"kubepods\.slice"), _c(rf"kubepods-{_QOS}\.slice"), _c(rf"kubepods-{_QOS}-{_POD_SYSTEMD}\.slice"), _KUBE_SCOPE),
    ),
    _ContainerLayout("kubepods", (_c(r"kubepods\.slice"), _c(rf"kubepods-{_POD_SYSTEMD}\.slice"), _KUBE_SCOPE)),
    # Kubernetes, cgroupfs driver: containerd and docker name the cgroup by the
    # bare id, CRI-O as "crio-<id>".
    _ContainerLayout("kubepods", (_c("kubepods"), _c(_QOS), _c(_POD_CGROUPFS), _c(rf"(?:(?P<rt>crio)-)?{_ID}"))),
    _ContainerLayout("kubepods", (_c("kubepods"), _c(_POD_CGROUPFS), _c(rf"(?:(?P<rt>crio)-)?{_ID}"))),
)

# A container scope inside a user's own tree: rootless podman and docker use
# the user manager's "user.slice" (libpod: SystemdDefaultRootlessCgroupParent).
_ROOTLESS_SCOPE = _c(rf"(?P<rt>docker|libpod|cri-containerd|crio)-{_ID}\.scope")

_SLICE = _c(r"[A-Za-z0-9:_.\\-]+\.slice")  # systemd's unit name characters
_SERVICE = _c(r"[A-Za-z0-9:_.\\@-]+\.service")
_STEPD_SCOPE = _c(r"(?:[A-Za-z0-9._-]+_)?slurmstepd\.scope")  # "<node>_" with multiple slurmd
_JOB = _c(r"job_(?P<job>[0-9]{1,10})")
_SLUID = _c(r"s[0-9A-HJKMNP-TV-Z]{13}")  # Slurm >= 26.05: "s" + 13 Crockford base32
_V1_ROOT = _c(r"slurm(?:_[A-Za-z0-9._-]+)?")  # CgroupPrepend "/slurm", or "/slurm_%n"
_V1_UID = _c(r"uid_[0-9]{1,10}")
_USER_SLICE = _c(r"user-(?P<uid>[0-9]{1,10})\.slice")
_USER_MANAGER = _c(r"user@(?P<uid>[0-9]{1,10})\.service")


def _components(path: str) -> tuple[str, ...]:
    """The components of an absolute path; () for anything else."""
    if not path.startswith("/"):
        return ()
    return tuple(path[1:].split("/"))


def _prefix_match(parts: tuple[str, ...], patterns: tuple[re.Pattern[str], ...]) -> re.Match[str] | None:
    """The last pattern's match when the first components match the patterns one to one."""
    if len(parts) < len(patterns):
        return None
    match = None
    for part, pattern in zip(parts, patterns):
        match = pattern.fullmatch(part)
        if match is None:
            return None
    return match


def _job_label(component: str) -> str:
    job = _JOB.fullmatch(component)
    if job is not None:
        return f"slurm:job_{int(job['job'])}"
    return f"slurm:{component}" if _SLUID.fullmatch(component) else ""


def _slurm(parts: tuple[str, ...]) -> str:
    """A Slurm job, from the cgroups slurmstepd's task/cgroup plugin makes."""
    if len(parts) < 3:
        return ""
    # cgroup v2: /<CgroupSlice>/[<node>_]slurmstepd.scope/<job_N or SLUID>/step_S/...
    # CgroupSlice defaults to system.slice; any top-level slice is root's.
    if _SLICE.fullmatch(parts[0]) and parts[0] != "user.slice" and _STEPD_SCOPE.fullmatch(parts[1]):
        return _job_label(parts[2])
    # cgroup v1 (every controller hierarchy): /slurm[_<node>]/uid_U/job_N/step_S/...
    if _V1_ROOT.fullmatch(parts[0]) and _V1_UID.fullmatch(parts[1]):
        job = _JOB.fullmatch(parts[2])
        return f"slurm:job_{int(job['job'])}" if job else ""
    return ""


def _container(parts: tuple[str, ...]) -> str:
    """A container that a root-run engine made, where that engine makes them."""
    for layout in _CONTAINER_LAYOUTS:
        match = _prefix_match(parts, layout.components)
        if match is not None:
            prefix = match.groupdict().get("rt")
            runtime = _RUNTIME[prefix] if prefix else layout.runtime
            return f"container:{runtime}/{match['id'][:12]}"
    return ""


def _unit(parts: tuple[str, ...]) -> str:
    """The system service a process runs in: /system.slice/[<x>.slice/...]<name>.service."""
    if not parts or parts[0] != "system.slice":
        return ""
    for part in parts[1:]:
        if _SERVICE.fullmatch(part):
            return f"unit:{part}"
        if not _SLICE.fullmatch(part):
            return ""
    return ""


def _own(parts: tuple[str, ...]) -> str:
    """A rootless container in a user's own manager tree, labelled as that user's claim."""
    if len(parts) < 4 or parts[0] != "user.slice":
        return ""
    user_slice = _USER_SLICE.fullmatch(parts[1])
    manager = _USER_MANAGER.fullmatch(parts[2])
    # systemd makes user@UID.service only inside user-UID.slice; anything else is not its tree.
    if user_slice is None or manager is None or user_slice["uid"] != manager["uid"]:
        return ""
    for part in parts[3:]:
        scope = _ROOTLESS_SCOPE.fullmatch(part)
        if scope is not None:
            return f"user:{int(manager['uid'])}/container:{_RUNTIME[scope['rt']]}/{scope['id'][:12]}"
    return ""


# Strongest claim first: a Slurm job beats the container or service that
# holds it (on v1, a job's tasks stay in slurmd.service in name=systemd), and
# every root-made label beats the user's own.
_RULES: tuple[Callable[[tuple[str, ...]], str], ...] = (_slurm, _container, _unit, _own)


def label(paths: CgroupPaths) -> str:
    """The label for a process's cgroup paths; '' when no manager we trust placed it."""
    every = tuple(_components(path) for path in paths.every())
    for rule in _RULES:
        for parts in every:
            found = rule(parts)
            if found:
                return found
    return ""


def label_path(path: str) -> str:
    """The label for a single cgroup path (a v2 host's only one)."""
    return label(CgroupPaths(unified=path))
