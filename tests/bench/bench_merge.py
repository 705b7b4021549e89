"""Benchmark `gua-report merge` of 50 host documents: whole-process wall time.

Not collected by pytest (no test_ prefix); prints figures, asserts nothing.
Builds one week of the simulator's lab8 host (8 GPUs, 1-minute ticks)
through the real collector, takes its `gua-report --since 7d --format json`
document, and writes 50 host documents from it: each its own host name and
database, and every other user renamed per host, so the identities table
has both users on every host and users on one host only (as a real fleet).
All cached under --cache.

Then it times, in fresh processes, `gua-report merge FILE x 50` in each
output form, and the same from one stream on stdin:
- "editable": the development venv's interpreter and editable install, as
  the tests run it (PYTHONDONTWRITEBYTECODE=1 here: recompiled each start);
- "installed": reporter/ copied to gua_report/ and byte-compiled, run by
  /usr/bin/python3 as the deb's /usr/bin/gua-report runs it (DESIGN.md:
  measure installed).

    .venv/bin/python tests/bench/bench_merge.py [--hosts 50] [--runs 21] [--cache DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)

from benchlib import add_variant_arguments, installed_copy, print_interpreter_start, time_runs, timed_row  # noqa: E402


def host_document(cache: str) -> dict:
    """One lab8 host's week, as gua-report --format json prints it (cached)."""
    path = os.path.join(cache, "bench-merge-lab8-7d.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    db = os.path.join(cache, "bench-merge-lab8-7d.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    t = time.monotonic()
    subprocess.run([os.path.join(BIN, "gua-collector"), "--db", db, "--backend", "simulate:lab8",
                    "--interval", "1m", "--ticks", "10080"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    out = subprocess.run([os.path.join(BIN, "gua-report"), "--db", db, "--since", "7d", "--format", "json",
                          "--tz", "UTC"], check=True, capture_output=True, text=True).stdout
    print(f"built a week of lab8 in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    with open(path, "w") as f:
        f.write(out)
    return json.loads(out)


def fleet_documents(doc: dict, hosts: int, target: str) -> list[str]:
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    paths = []
    for n in range(hosts):
        d = copy.deepcopy(doc)
        host = f"gpu{n + 1:02d}"
        d["database"]["hostnames"] = [host]
        d["database"]["created_ms"] = (d["database"]["created_ms"] or 0) + n
        for g in d["gpus"]:
            g["uuid"] = f"{g['uuid']}-{host}"
        for kind in ("users", "units"):
            for i, u in enumerate(d["identities"][kind]):
                u["gpus"] = [f"{x}-{host}" for x in u["gpus"]]
                if i % 2:  # every other user exists on this host only
                    u["user"] = f"{u['user']}-{host}"
        path = os.path.join(target, f"{host}.json")
        with open(path, "w") as f:
            json.dump(d, f, indent=2)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=50)
    add_variant_arguments(ap)
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    doc = host_document(args.cache)
    paths = fleet_documents(doc, args.hosts, os.path.join(args.cache, "bench-merge-hosts"))
    stream = os.path.join(args.cache, "bench-merge-stream.json")
    with open(stream, "w") as out:
        for p in paths:
            with open(p) as f:
                out.write(f.read() + "\n")
    size = sum(os.path.getsize(p) for p in paths)
    print(f"{args.hosts} host documents: {len(doc['gpus'])} GPUs and {len(doc['identities']['users'])} users "
          f"each, {size / args.hosts / 1024:.0f} KiB each, {size / 2**20:.1f} MiB in all")

    site = installed_copy(os.path.join(args.cache, "installed-gua"))
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    variants = {
        "editable": ([sys.executable, "-m", "gua_report"], base),
        "installed": ([args.system_python, "-m", "gua_report"], {**base, "PYTHONPATH": site}),
    }
    forms = {"text": ["--tz", "UTC"], "json": ["--format", "json"], "csv": ["--format", "csv"]}
    print(f"{'variant':<10} {'form':<12} {'median':>10} {'min':>10} {'max':>10} {'CPU median':>11}"
          f"  (whole process, {args.runs} runs)")
    for name, (exe, env) in variants.items():
        for form, extra in forms.items():
            print(timed_row(name, form, 12, *time_runs([*exe, "merge", *extra, *paths], env, args.runs)))
        print(timed_row(name, "text, stdin", 12,
                        *time_runs([*exe, "merge", "--tz", "UTC", "-"], env, args.runs, stdin=stream)))
    print_interpreter_start(variants, args.runs, args.system_python)


if __name__ == "__main__":
    main()
