#!/bin/sh
# Soak the live crash cells (issue 22): run every cell of
# tests/transport/test_live_secure.py LiveCrashPointTests N times (default
# 10), one at a time, with two CPU burners beside them (busy loops, ended by
# pid when the soak ends), and print how many runs of each cell passed.
#
#   scripts/soak-live.sh [--libvirt] [N] [CELL-NAME-REGEX]
#
# --libvirt soaks the libvirt live crash cells instead
# (tests/transport/test_live_libvirt_crash.py LibvirtCrashCells; they need
# the libvirt packages `make setup` installs).
#
# CELL-NAME-REGEX picks the cells whose test name it matches (Python's
# re.search: "source_daemon|continuing" runs those only;
# "^test_(?!.*continuing)" all but those).
#
# One line per run ("CELL i/N: ok|FAILED in S s") and then one per cell
# ("CELL: passed/N").  Each failed run's trial output is kept in $SOAK_DIR
# (default /tmp/securemig-soak-live.XXXX) with its temporary directory
# (trial-CELL-i): the guest's consoles are in the test's temporary directory
# (consoles/), a panic says so.
set -eu

MODULE=tests.transport.test_live_secure
CLASS=LiveCrashPointTests
if [ "${1:-}" = "--libvirt" ]; then
    MODULE=tests.transport.test_live_libvirt_crash
    CLASS=LibvirtCrashCells
    shift
fi
N=${1:-10}
FILTER=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TRIAL="$HERE/.venv/bin/trial"
SOAK_DIR=${SOAK_DIR:-$(mktemp -d /tmp/securemig-soak-live.XXXX)}
mkdir -p "$SOAK_DIR"
cd "$HERE"

cells=$("$HERE/.venv/bin/python" - "$MODULE" "$CLASS" "$FILTER" <<'PYTHON'
import importlib
import re
import sys
cells = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
for name in sorted(dir(cells)):
    if name.startswith("test_") and re.search(sys.argv[3], name):
        print(name)
PYTHON
)

burners=""
cleanup() {
    for pid in $burners; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
for _ in 1 2; do
    sh -c 'while :; do :; done' &
    burners="$burners $!"
done

echo "soak: $N runs of each cell of $CLASS at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), two CPU burners (pids$burners); failures in $SOAK_DIR"
for cell in $cells; do
    passed=0
    i=1
    while [ "$i" -le "$N" ]; do
        out="$SOAK_DIR/$cell.$i.log"
        started=$(date +%s)
        if "$TRIAL" --temp-directory "$SOAK_DIR/trial-$cell-$i" \
            "$MODULE.$CLASS.$cell" >"$out" 2>&1; then
            passed=$((passed + 1))
            verdict=ok
            rm -rf "$out" "$SOAK_DIR/trial-$cell-$i"
        else
            verdict=FAILED
        fi
        echo "$cell $i/$N: $verdict in $(($(date +%s) - started)) s"
        i=$((i + 1))
    done
    echo "$cell: $passed/$N"
done
