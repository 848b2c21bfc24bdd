#!/bin/sh
# Soak the live crash cells (issue 22): run every cell of
# tests/transport/test_live_secure.py LiveCrashPointTests N times (default
# 10), one at a time, with two CPU burners beside them (busy loops, ended by
# pid when the soak ends), and print how many runs of each cell passed.
#
#   scripts/soak-live.sh [N] [CELL-NAME-REGEX]
#
# CELL-NAME-REGEX picks the cells whose test name it matches (Python's
# re.search: "source_daemon|continuing" runs those only).
#
# Each failed run's trial output is kept in $SOAK_DIR (default
# /tmp/securemig-soak-live.XXXX): the guest's consoles are in the test's
# temporary directory (consoles/), a panic says so.
set -eu

N=${1:-10}
FILTER=${2:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TRIAL="$HERE/.venv/bin/trial"
SOAK_DIR=${SOAK_DIR:-$(mktemp -d /tmp/securemig-soak-live.XXXX)}
cd "$HERE"

cells=$("$HERE/.venv/bin/python" - "$FILTER" <<'EOF'
import re
import sys
from tests.transport.test_live_secure import LiveCrashPointTests
for name in sorted(dir(LiveCrashPointTests)):
    if name.startswith("test_") and re.search(sys.argv[1], name):
        print(name)
EOF
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

echo "soak: $N runs of each cell, two CPU burners (pids$burners); failures in $SOAK_DIR"
for cell in $cells; do
    passed=0
    i=1
    while [ "$i" -le "$N" ]; do
        out="$SOAK_DIR/$cell.$i.log"
        if "$TRIAL" --temp-directory "$SOAK_DIR/trial-$cell-$i" \
            "tests.transport.test_live_secure.LiveCrashPointTests.$cell" >"$out" 2>&1; then
            passed=$((passed + 1))
            rm -rf "$out" "$SOAK_DIR/trial-$cell-$i"
        fi
        i=$((i + 1))
    done
    echo "$cell: $passed/$N"
done
