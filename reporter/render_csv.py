"""CSV output in one long ("tidy") table: section, subject, metric, value.

One shape for every section means a spreadsheet pivot or `grep`/`awk` can
take any block without knowing its columns. Values and names are exactly
those of the JSON output (see JSON.md); nested fields are joined with '.'.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from .classify import Report
from .render_json import WEEKDAYS, to_dict

HEADER = ("section", "subject", "metric", "value")


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flat(f"{prefix}.{k}" if prefix else k, v)
        return out
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return [(prefix, ";".join("" if v is None else str(v) for v in value))]
        out = []
        for n, v in enumerate(value):
            out += _flat(f"{prefix}.{n}", v)
        return out
    return [(prefix, value)]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render(rep: Report) -> str:
    d = to_dict(rep)
    rows: list[tuple[str, str, str, Any]] = []

    def block(section: str, subject: str, data: Any) -> None:
        rows.extend((section, subject, m, v) for m, v in _flat("", data))

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

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for section, subject, metric, value in rows:
        w.writerow((section, subject, metric, _cell(value)))
    return buf.getvalue()
