#!/bin/sh
# The README's demo, every command printed before it runs:
#  1. a week of simulated telemetry (the `lab` scenario, 1 min ticks) written
#     by the real collector code path into DB (default demo.db),
#  2. the report of that week,
#  3. the collector live for a few 2 s ticks, so that `gua-report now`, its
#     --check mode and `gua-collector --check` have a present to look at,
#  4. a clean stop of the live collector.
# Usage: ./demo.sh [DB]   (GUA_BIN: where gua-collector and gua-report are; default .venv/bin)
set -eu
bin=${GUA_BIN:-.venv/bin}
db=${1:-demo.db}
pid=

show() { printf '\n$ %s\n' "$*" | sed "s|$bin/||"; }
run() { show "$@"; "$@"; }
# --check modes answer with their verdict as the exit code: shown, not fatal.
verdict() { show "$@"; rc=0; "$@" || rc=$?; echo "(exit $rc)"; }
stop() { [ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" || true; pid=; }; }
trap stop EXIT INT TERM

if [ -e "$db" ]; then
    echo "demo.sh: $db exists; remove it or name another file (./demo.sh other.db)" >&2
    exit 2
fi
run "$bin/gua-collector" --db "$db" --backend simulate:lab --interval 1m --ticks 10080
run "$bin/gua-report" --db "$db" --since 7d

show "$bin/gua-collector" --db "$db" --backend simulate:lab --interval 2s "&"
"$bin/gua-collector" --db "$db" --backend simulate:lab --interval 2s 2>"$db.live.log" &
pid=$!
# `now` answers once the live run has written a tick; two more give each
# process a CPU reading over a whole tick.
tries=0
until "$bin/gua-report" now --db "$db" >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ] || ! kill -0 "$pid" 2>/dev/null; then
        echo "demo.sh: the live collector wrote no tick; its log:" >&2
        cat "$db.live.log" >&2
        exit 1
    fi
    sleep 1
done
sleep 4
run "$bin/gua-report" now --db "$db"
verdict "$bin/gua-report" now --db "$db" --check --warn 2h --crit 8h
verdict "$bin/gua-collector" --check --db "$db" --backend simulate:lab
show kill -TERM "$pid"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
if [ "$rc" -ne 0 ]; then
    echo "demo.sh: the live collector exited $rc on SIGTERM; its log:" >&2
    cat "$db.live.log" >&2
    exit 1
fi
rm -f "$db.live.log"
