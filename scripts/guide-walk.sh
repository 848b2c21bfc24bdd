#!/bin/bash
# doc/operators-guide.rst, "A test site on one machine", literally: two hosts
# with simulated TPMs and a privacy CA in a temporary directory, nine commands;
# ends every process it started.  PCA_PORT (8443) and PORT (9001) choose the ports.
set -e
export PATH=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH
W=$(mktemp -d -t securemig-walk-XXXXXX); mkdir -p $W/host-a $W/host-b; cd $W
PCA_PORT=${PCA_PORT:-8443}; PORT=${PORT:-9001}
cleanup() { for f in host-b pca tpm; do [ -f $W/$f.pid ] && kill $(cat $W/$f.pid) 2>/dev/null; done; wait; }
trap cleanup EXIT
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
while ! grep -q "running as pid" tpm.out; do sleep 0.3; done; cat tpm.out
TA=$(grep TCTI tpm.out | sed -n 1p | cut -d' ' -f2); TB=$(grep TCTI tpm.out | sed -n 2p | cut -d' ' -f2)
step securemig ca init site-ca; securemig ca init site-ca
step securemig pca init pca --vendor-ca tpm-a/vendor-ca --tls-name localhost --site-ca site-ca
securemig pca init pca --vendor-ca tpm-a/vendor-ca --tls-name localhost --site-ca site-ca
step twistd -n securemig-pca --dir pca --listen ssl:$PCA_PORT:interface=127.0.0.1 '&'
twistd -n securemig-pca --dir pca --listen ssl:$PCA_PORT:interface=127.0.0.1 > pca.out 2>&1 & echo $! > pca.pid
while ! grep -q "listening for enrollments" pca.out; do sleep 0.3; done
for h in a b; do
  T=$TA; [ $h = b ] && T=$TB
  step securemig --config host-$h/securemig.toml host init --name host-$h --tpm $T --site-ca site-ca --pca https://localhost:$PCA_PORT --pca-ca pca/ca.pem
  securemig --config host-$h/securemig.toml host init --name host-$h --tpm $T --site-ca site-ca --pca https://localhost:$PCA_PORT --pca-ca pca/ca.pem
done
step twistd -n securemig --config host-b/securemig.toml '&'
twistd -n securemig --config host-b/securemig.toml > host-b.out 2>&1 & echo $! > host-b.pid
while ! grep -q "listening for secure" host-b.out; do sleep 0.3; done
step securemig --config host-a/securemig.toml vm create vm1 --ram-mib 64
securemig --config host-a/securemig.toml vm create vm1 --ram-mib 64
step securemig --config host-a/securemig.toml migrate vm1
securemig --config host-a/securemig.toml migrate vm1 2>&1 | grep -v "WARNING:   PCR"
echo "### status at host-b"; securemig --config host-b/securemig.toml status
