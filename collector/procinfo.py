"""Who a GPU process is, from /proc: uid, user name, command, cgroup, start time."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable

from .attribution import Layout, hierarchy_layout, label, label_path, split_cgroup_file
from .records import ProcessInfo, ProcUsage

# The old name, still imported by simulate.py and the report tests.
unit_from_cgroup = label_path


def parse_cgroup_file(text: str) -> str:
    """The path shown for a /proc/PID/cgroup file (v2, else name=systemd); '' if ambiguous."""
    paths = split_cgroup_file(text)
    return paths.shown if paths is not None else ""


def _stat_fields(text: str) -> list[str]:
    """The fields after comm (field 3 on), split: comm itself may hold spaces and parentheses."""
    return text[text.rindex(")") + 2 :].split()


def parse_stat_starttime(text: str) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot); comm may hold spaces and ')'."""
    return int(_stat_fields(text)[19])


def _cpu_with_reaped(rest: list[str]) -> int:
    """utime + stime + cutime + cstime (fields 14-17, clock ticks): a process's CPU with its reaped children's."""
    return int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])


def parse_stat_usage(text: str) -> tuple[int, int, int]:
    """(CPU with reaped children in clock ticks, rss in pages, starttime in ticks): fields 14-17, 24, 22."""
    rest = _stat_fields(text)
    return _cpu_with_reaped(rest), int(rest[21]), int(rest[19])


def parse_stat_tree_cpu(text: str) -> tuple[int, int]:
    """(CPU with reaped children in clock ticks, ppid): fields 14-17 and 4."""
    rest = _stat_fields(text)
    return _cpu_with_reaped(rest), int(rest[1])


def parse_host_cpu(stat_text: str) -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs from the first line of /proc/stat.

    Idle and iowait are not busy; guest time is already inside user and nice,
    so only the first eight fields add up to the total.
    """
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:9]]
            if len(fields) < 5:
                return None
            total = sum(fields)
            return total - fields[3] - fields[4], total
    return None


def parse_real_uid(status_text: str) -> int | None:
    """The real uid from /proc/PID/status."""
    for line in status_text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


# Files read per GPU process and tick for its descendants' CPU (each thread's
# children list, each descendant's stat): a process tree larger than this has
# its CPU unknown rather than costing the collector's tick without bound.
MAX_TREE_READS = 1024


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def proc_hidden(mountinfo: str, groups: set[int]) -> str:
    """The hidepid= option of the /proc mount when it hides processes from us, else ''."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[4] != "/proc":
            continue
        # Mount options, then (after "-", fstype and source) the superblock's.
        sep = fields.index("-") if "-" in fields else len(fields)
        options = fields[5].split(",") + (fields[sep + 3].split(",") if sep + 3 < len(fields) else [])
        hide = next((o.split("=", 1)[1] for o in options if o.startswith("hidepid=")), "0")
        gid = next((o.split("=", 1)[1] for o in options if o.startswith("gid=")), "")
        if hide not in ("0", "off") and not (gid.isdigit() and int(gid) in groups):
            return f"/proc is mounted hidepid={hide}: other users' GPU processes may be invisible (add the gua group with gid=)"
    return ""


def boot_time_ms(proc_root: str = "/proc") -> int:
    """Boot time in UTC epoch ms, from the btime line of /proc/stat."""
    for line in _read(f"{proc_root}/stat").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) * 1000
    raise OSError("no btime in /proc/stat")


class ProcReader:
    """Looks processes up in /proc, remembering who each (pid, start) was."""

    def __init__(
        self,
        proc_root: str = "/proc",
        username_of: Callable[[int], str] | None = None,
    ) -> None:
        self._root = proc_root
        self._boot_ms = boot_time_ms(proc_root)
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._username_of = username_of or _passwd_name
        self._names: dict[int, str] = {}
        self._known: dict[tuple[int, int], ProcessInfo] = {}

    def lookup(self, pid: int) -> ProcessInfo | None:
        """ProcessInfo for a live pid, or None when it is gone or unreadable."""
        base = f"{self._root}/{pid}"
        try:
            start_ticks = parse_stat_starttime(_read(f"{base}/stat"))
        except PermissionError:
            # /proc mounted hidepid=1: alive but unreadable. Its memory still
            # holds the GPU, so keep it, with an identity we cannot know.
            return self._unknown(pid)
        except (OSError, ValueError, IndexError):
            return None
        start_ms = self._boot_ms + start_ticks * 1000 // self._ticks_per_s
        key = (pid, start_ms)
        known = self._known.get(key)
        if known is not None:
            return known
        try:
            uid = parse_real_uid(_read(f"{base}/status"))
            comm = _read(f"{base}/comm").strip()
            paths = split_cgroup_file(_read(f"{base}/cgroup"), self._layout())
        except PermissionError:
            return self._unknown(pid)
        except (OSError, ValueError):
            return None
        info = ProcessInfo(
            pid=pid,
            start_ms=start_ms,
            uid=uid,
            username=self._name(uid),
            comm=comm,
            # A file whose lines a newline in a directory name forged shows no path and no label.
            cgroup=paths.shown if paths is not None else "",
            unit=label(paths) if paths is not None else "",
        )
        self._known[key] = info
        return info

    def _layout(self) -> Layout | None:
        """The host's cgroup hierarchies, from our own cgroup file, read afresh in case one was mounted."""
        try:
            return hierarchy_layout(_read(f"{self._root}/self/cgroup"))
        except OSError:
            return None

    def usage(self, process: ProcessInfo, skip: frozenset[int] = frozenset()) -> ProcUsage | None:
        """CPU time and RSS of that process, if the pid still is that process.

        The CPU time is the process's with its descendants' (live ones, and
        those it has waited for): a training process whose DataLoader workers
        load data does little itself while its GPU waits, and is not
        abandoned. Descendants in `skip` (GPU processes measured on their
        own) are left out, with their subtrees.
        """
        if process.start_ms == 0:
            return None  # identity unknown (hidepid): cannot tell a reused pid
        try:
            cpu_ticks, rss_pages, start_ticks = parse_stat_usage(_read(f"{self._root}/{process.pid}/stat"))
        except (OSError, ValueError, IndexError):
            return None
        if self._boot_ms + start_ticks * 1000 // self._ticks_per_s != process.start_ms:
            return None  # the pid now belongs to another process
        workers = self._descendants_cpu(process.pid, skip)
        return ProcUsage(None if workers is None else (cpu_ticks + workers) * 1000 // self._ticks_per_s,
                         rss_pages * self._page_size)

    def _descendants_cpu(self, pid: int, skip: frozenset[int]) -> int | None:
        """Clock ticks of pid's live descendants and their reaped children; None past MAX_TREE_READS.

        A descendant that exits is then counted in its parent's cutime and
        cstime once reaped, so the sum only grows. Without the kernel's
        children files (CONFIG_PROC_CHILDREN) this is 0: the process alone.
        """
        total, reads, seen, todo = 0, 0, {pid}, [pid]
        while todo:
            parent = todo.pop()
            try:
                threads = os.listdir(f"{self._root}/{parent}/task")
            except OSError:
                continue  # gone meanwhile
            if reads + len(threads) > MAX_TREE_READS:
                return None
            children: list[int] = []
            for tid in threads:
                reads += 1
                try:
                    children += [int(c) for c in _read(f"{self._root}/{parent}/task/{tid}/children").split()]
                except (OSError, ValueError):
                    continue
            for child in children:
                if child in seen or child in skip:
                    continue
                seen.add(child)
                reads += 1
                try:
                    cpu, ppid = parse_stat_tree_cpu(_read(f"{self._root}/{child}/stat"))
                except (OSError, ValueError, IndexError):
                    continue  # exited between the two reads: its parent's cutime has it once reaped
                if ppid != parent:
                    continue  # exited and its pid reused meanwhile: another process's CPU since its start
                total += cpu
                todo.append(child)
            if reads > MAX_TREE_READS:
                return None
        return total

    def host_cpu(self) -> tuple[int, int] | None:
        """(busy ms, total ms) of all CPUs since boot."""
        try:
            ticks = parse_host_cpu(_read(f"{self._root}/stat"))
        except OSError:
            return None
        if ticks is None:
            return None
        return ticks[0] * 1000 // self._ticks_per_s, ticks[1] * 1000 // self._ticks_per_s

    def hidden(self) -> str:
        """Why other users' processes may be invisible here ('' when they are not)."""
        try:
            mountinfo = _read(f"{self._root}/self/mountinfo")
        except OSError:
            return ""
        return proc_hidden(mountinfo, set(os.getgroups()) | {os.getegid()})

    def _unknown(self, pid: int) -> ProcessInfo:
        return ProcessInfo(pid=pid, start_ms=0, uid=None, username="unknown", comm="?", cgroup="", unit="")

    def retain(self, live: set[tuple[int, int]]) -> None:
        """Drop cached processes that are no longer on any GPU, so the cache stays small."""
        for key in list(self._known):
            if key not in live:
                del self._known[key]

    def _name(self, uid: int | None) -> str:
        if uid is None:
            return "unknown"
        if uid not in self._names:
            self._names[uid] = self._username_of(uid)
        return self._names[uid]


def _passwd_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"
