#!/bin/bash
# doc/operators-guide.rst, "A test site on one machine", literally: two hosts
# with simulated TPMs and a privacy CA in a temporary directory, nine commands;
# ends every process it started (by its pid) and removes the directory (KEEP=1
# keeps it).  PCA_PORT (8443) and PORT (9001) choose the ports; a port already
# taken stops it at once, saying which.  A step waited for gives up after
# WAIT_S (120) seconds, or at once when its process died, showing its log.
set -e
export PATH=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH
PCA_PORT=${PCA_PORT:-8443}; PORT=${PORT:-9001}; WAIT_S=${WAIT_S:-120}
fail() { echo "guide-walk: $*" >&2; exit 1; }
# Before anything is created: the ports must be free (bindable) on loopback.
for p in "$PORT" "$PCA_PORT"; do
  python -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$p" 2>/dev/null \
    || fail "port $p on 127.0.0.1 is in use by another program; choose free ones with PORT=... PCA_PORT=... (nothing was started)"
done
[ "$PORT" != "$PCA_PORT" ] || fail "PORT and PCA_PORT must differ (both $PORT)"
W=$(mktemp -d -t securemig-walk-XXXXXX)
cleanup() {
  # `|| true`: under set -e a kill of one already gone (a daemon that failed
  # to start) would end the cleanup there and leave the others running.
  for f in host-b pca tpm; do
    if [ -f "$W/$f.pid" ]; then kill "$(cat "$W/$f.pid")" 2>/dev/null || true; fi
  done
  wait || true
  cd /
  if [ -n "$KEEP" ]; then echo "guide-walk: kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p $W/host-a $W/host-b $W/tmp; cd $W
# What the commands put in the temporary directory (TPM lock files) goes too.
export TMPDIR=$W/tmp
# wait_for LOG PATTERN PIDFILE: until LOG says PATTERN; fail if the process died or time ran out.
wait_for() {
  local deadline=$((SECONDS + WAIT_S))
  until grep -q "$2" "$1" 2>/dev/null; do
    if ! kill -0 "$(cat "$3")" 2>/dev/null; then
      tail -n 20 "$1" >&2; fail "${3%.pid} exited before it said \"$2\" (its log is above)"
    fi
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$1" >&2; fail "${3%.pid} did not say \"$2\" within $WAIT_S s"; }
    sleep 0.3
  done
}
cat > host-a/securemig.toml <<EOF
[paths]
identity = "$W/host-a/identity"
state-dir = "$W/host-a/state"
vm-dir = "$W/host-a/vms"
[migrate]
destination = "127.0.0.1:$PORT"
destination-name = "host-b"
tofu = true
EOF
cat > host-b/securemig.toml <<EOF
[paths]
identity = "$W/host-b/identity"
state-dir = "$W/host-b/state"
[service]
listen = "tcp:$PORT:interface=127.0.0.1"
tofu = true
EOF
n=0; step() { n=$((n+1)); echo "### $n: $*"; }
step securemig tpm simulate tpm-a tpm-b '&'
securemig tpm simulate tpm-a tpm-b > tpm.out 2>&1 & echo $! > tpm.pid
wait_for tpm.out "running as pid" tpm.pid; cat tpm.out
TA=$(grep TCTI tpm.out | sed -n 1p | cut -d' ' -f2); TB=$(grep TCTI tpm.out | sed -n 2p | cut -d' ' -f2)
step securemig ca init site-ca; securemig ca init site-ca
step securemig pca init pca --vendor-ca tpm-a/vendor-ca --tls-name localhost --site-ca site-ca
securemig pca init pca --vendor-ca tpm-a/vendor-ca --tls-name localhost --site-ca site-ca
step twistd -n securemig-pca --dir pca --listen ssl:$PCA_PORT:interface=127.0.0.1 '&'
twistd -n securemig-pca --dir pca --listen ssl:$PCA_PORT:interface=127.0.0.1 > pca.out 2>&1 & echo $! > pca.pid
wait_for pca.out "listening for enrollments" pca.pid
for h in a b; do
  T=$TA; [ $h = b ] && T=$TB
  step securemig --config host-$h/securemig.toml host init --name host-$h --tpm $T --site-ca site-ca --pca https://localhost:$PCA_PORT --pca-ca pca/ca.pem
  securemig --config host-$h/securemig.toml host init --name host-$h --tpm $T --site-ca site-ca --pca https://localhost:$PCA_PORT --pca-ca pca/ca.pem
done
step twistd -n securemig --config host-b/securemig.toml '&'
twistd -n securemig --config host-b/securemig.toml > host-b.out 2>&1 & echo $! > host-b.pid
wait_for host-b.out "listening for secure" host-b.pid
step securemig --config host-a/securemig.toml vm create vm1 --ram-mib 64
securemig --config host-a/securemig.toml vm create vm1 --ram-mib 64
step securemig --config host-a/securemig.toml migrate vm1
securemig --config host-a/securemig.toml migrate vm1 2>&1 | grep -v "WARNING:   PCR"
echo "### status at host-b"; securemig --config host-b/securemig.toml status
