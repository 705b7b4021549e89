"""A note beside the database of ticks a run could not write before it stopped.

When the disk refuses writes at stop, the DB cannot record its own loss;
this small file carries the count to the next start, which files it as a
db_error event and deletes it. The file is created without following links
and read only when it is ours, so another account cannot plant a note.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

SUFFIX = ".unsaved"
MAX_BYTES = 64 * 1024  # a note is one short line per stop; anything bigger is not ours


@dataclass(frozen=True)
class Unsaved:
    """Ticks lost at one stop."""

    count: int
    first_ms: int
    last_ms: int
    reason: str


def save(db_path: str, lost: Unsaved) -> None:
    """Append one line for this stop; raises OSError when even that cannot be written."""
    line = json.dumps({"count": lost.count, "first_ms": lost.first_ms, "last_ms": lost.last_ms,
                       "reason": lost.reason[:300]}) + "\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(db_path + SUFFIX, flags, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{db_path}{SUFFIX} is not a regular file")
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def take(db_path: str) -> list[Unsaved]:
    """The notes left by earlier stops, then the file is gone; [] when none (or not ours)."""
    path = db_path + SUFFIX
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > MAX_BYTES:
            return []
        text = os.read(fd, MAX_BYTES).decode("utf-8", errors="replace")
    finally:
        os.close(fd)
    notes = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
            notes.append(Unsaved(int(item["count"]), int(item["first_ms"]), int(item["last_ms"]), str(item["reason"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the full disk
    try:
        os.unlink(path)
    except OSError:
        pass
    return notes
