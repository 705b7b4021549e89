"""CSV output in one long ("tidy") table: section, subject, metric, value.

One shape for every section means a spreadsheet pivot or `grep`/`awk` can
take any block without knowing its columns. Values and names are exactly
those of the JSON output (see JSON.md); nested fields are joined with '.'.
One exception keeps a spreadsheet from running what other users typed: a
text cell that begins like a formula gets a leading "'" (see `csv_cell`).
"""

from __future__ import annotations

import csv
import io
import re

from .render_json import WEEKDAYS, to_dict

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

    from .classify import Report

HEADER = ("section", "subject", "metric", "value")

# A cell starting with one of these is a formula (or, after a TAB/CR, may
# become one) in Excel, LibreOffice and Google Sheets: =HYPERLINK(...),
# +cmd|..., -2+3, @SUM(...). User names, units, host names and event
# details are chosen by users, so any text cell may start with one.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ... unless the text is a plain number, which a spreadsheet reads as a number.
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten(f"{prefix}.{k}" if prefix else k, v)
        return out
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return [(prefix, ";".join("" if v is None else str(v) for v in value))]
        out = []
        for n, v in enumerate(value):
            out += flatten(f"{prefix}.{n}", v)
        return out
    return [(prefix, value)]


def csv_cell(v: Any) -> str:
    """One CSV cell. Numbers are written as numbers; text that a spreadsheet
    would run as a formula gets the OWASP prefix "'", which makes it text."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return csv_text(str(v))


def csv_text(s: str) -> str:
    if s.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(s):
        return "'" + s
    return s


def render(rep: Report) -> str:
    d = to_dict(rep)
    rows: list[tuple[str, str, str, Any]] = []

    def block(section: str, subject: str, data: Any) -> None:
        rows.extend((section, subject, m, v) for m, v in flatten("", data))

    block("report", "", {"format_version": d["format_version"], "generator": d["generator"]})
    block("database", "", d["database"])
    block("window", "", d["window"])
    block("rules", "", d["rules"])
    block("headline", "", d["headline"])
    block("idle_capacity", "", d["idle_capacity"])
    for g in d["gpus"]:
        block("gpu", g["uuid"], g)
    for kind in ("users", "units"):
        for i in d["identities"][kind]:
            subject = f"{i['user']}/{i['unit']}" if "unit" in i else i["user"]
            block("user" if kind == "users" else "unit", subject, i)
    hm = d["heatmap"]
    for wd in range(7):
        for hr in range(24):
            if hm["known_ms"][wd][hr]:
                block("heatmap", f"{WEEKDAYS[wd]} {hr:02d}", {
                    "active_share": hm["active_share"][wd][hr],
                    "active_ms": hm["active_ms"][wd][hr],
                    "known_ms": hm["known_ms"][wd][hr],
                })
    block("energy", "", d["energy"])
    dq = dict(d["data_quality"])
    for key, section in (("gap_events", "gap_event"), ("holes", "hole"), ("runs", "run")):
        for n, item in enumerate(dq.pop(key)):
            block(section, str(item.get("run_id", n)) if key == "runs" else str(n), item)
    for item in dq.pop("host_errors"):
        block("host_error", item["kind"], item)
    block("data_quality", "", dq)

    return write(HEADER, ((csv_text(section), csv_text(subject), csv_text(metric), csv_cell(value))
                          for section, subject, metric, value in rows))


def write(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The header row, then `rows` of cells already made safe (`csv_cell`, `csv_text`), as CSV text."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # The csv module quotes a cell holding "\n" but not one holding a bare
    # "\r", which a spreadsheet reads as a line break: a host name could
    # forge rows. Such rows are written with every cell quoted.
    w_quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    w.writerow(header)
    for cells in rows:
        (w_quoted if any("\r" in c for c in cells) else w).writerow(cells)
    return buf.getvalue()
