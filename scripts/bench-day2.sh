#!/usr/bin/env bash
# Day-2 figures on a host-mode etcd node, each beside a reference measured
# in the same run (not part of the test run):
#   - an etcd snapshot of a ~100 MB keyspace through `osctl etcd snapshot`
#     (node relays etcd's Maintenance/Snapshot over the mTLS API, checks it
#     on both ends), against `etcdctl snapshot save` straight from etcd;
#   - `osctl bootstrap --recover-from` of that snapshot to healthy, against
#     `etcdctl snapshot restore` alone;
#   - a metrics scrape (HTTPS, client certificate) against `osctl version`
#     (one API call over the same kind of connection);
#   - machined's RSS idle (configured, etcd running) and after 50 scrapes.
# SIZE_MB=N sets the keyspace size (default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc curl bc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -q -p osctl -p machined
osctl=$PWD/target/release/osctl
machined=$PWD/target/release/machined
out=$PWD/${OUT:-_out}/bench-day2
ip=${NODE_IP:-127.0.19.1}
size_mb=${SIZE_MB:-100}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
secs() { echo "$(date +%s.%N) - $1" | bc; }
pkill -9 -f -- "$out/node" 2>/dev/null || true
sleep 0.5
rm -rf "$out"
mkdir -p "$out/node"
"$osctl" gen config bench "https://$ip:6443" --output-dir "$out/cluster" --force >/dev/null
export OSCONFIG=$out/cluster/osconfig
start_node() {
  setsid "$machined" --root "$out/node" --listen "$ip:50000" --hostname bench-etcd \
    > "$out/node.log" 2>&1 < /dev/null &
  pid=$!
  for _ in $(seq 200); do grep -q '^token:' "$out/node.log" 2>/dev/null && break; sleep 0.05; done
}
apply() {
  local fp token
  fp=$(awk '/^fingerprint:/ {f=$2} END {print f}' "$out/node.log")
  token=$(awk '/^token:/ {t=$2} END {print t}' "$out/node.log")
  "$osctl" apply-config --insecure --cert-fingerprint "$fp" --token "$token" -n "$ip" \
    -f "$out/cluster/controlplane.yaml" >/dev/null
  for _ in $(seq 200); do "$osctl" version -n "$ip" >/dev/null 2>&1 && break; sleep 0.1; done
}
start_node
apply
"$osctl" bootstrap -n "$ip" >/dev/null
"$osctl" health -n "$ip" --wait 60 >/dev/null

certs=$out/etcd-client
"$osctl" gen etcd-client --with-secrets "$out/cluster/secrets.yaml" --output-dir "$certs" >/dev/null
ctl() {
  ETCDCTL_API=3 etcdctl --endpoints "https://$ip:2379" --cacert "$certs/ca.crt" \
    --cert "$certs/client.crt" --key "$certs/client.key" "$@"
}
# ~1 MiB values (etcd's request limit is 1.5 MiB).
python3 -c 'import base64, os, sys; sys.stdout.write(base64.b64encode(os.urandom(750000)).decode())' > "$out/value"
for i in $(seq "$size_mb"); do ctl put "k$i" < "$out/value" >/dev/null; done
printf 'keyspace: %d keys of 1 MB\n' "$size_mb"

t=$(date +%s.%N)
ctl snapshot save "$out/ref.db" >/dev/null
ref=$(secs "$t")
t=$(date +%s.%N)
"$osctl" etcd snapshot "$out/ours.db" -n "$ip" >/dev/null
ours=$(secs "$t")
printf 'snapshot: %s bytes; osctl etcd snapshot %.2f s, etcdctl snapshot save %.2f s (reference): %.2fx\n' \
  "$(stat -c %s "$out/ours.db")" "$ours" "$ref" "$(echo "$ours / $ref" | bc -l)"

t=$(date +%s.%N)
ETCDCTL_API=3 etcdctl snapshot restore "$out/ours.db" --data-dir "$out/restore-ref" >/dev/null 2>&1
ref=$(secs "$t")
"$osctl" reset --force -n "$ip" >/dev/null
for _ in $(seq 200); do [ "$(grep -c '^token:' "$out/node.log")" -ge 2 ] && break; sleep 0.1; done
apply
t=$(date +%s.%N)
"$osctl" bootstrap --recover-from "$out/ours.db" -n "$ip" >/dev/null
"$osctl" health -n "$ip" --wait 120 >/dev/null
ours=$(secs "$t")
printf 'recovery: osctl bootstrap --recover-from to healthy %.2f s, etcdctl snapshot restore alone %.2f s (reference): %.2fx\n' \
  "$ours" "$ref" "$(echo "$ours / $ref" | bc -l)"

# Metrics: the osconfig context's client certificate.
python3 - "$OSCONFIG" "$out" <<'PY'
import sys, yaml, os
cfg = yaml.safe_load(open(sys.argv[1]))
ctx = cfg["contexts"][cfg["context"]]
for k in ("ca", "crt", "key"):
    open(os.path.join(sys.argv[2], "client." + k), "w").write(ctx[k])
PY
idle=$(rss_kib "$pid")
scrape() { curl -sf -o /dev/null -w '%{time_total}\n' --cacert "$out/client.ca" --cert "$out/client.crt" --key "$out/client.key" "https://$ip:50002/metrics"; }
version() { local t; t=$(date +%s.%N); "$osctl" version -n "$ip" >/dev/null; secs "$t"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m=$(for _ in $(seq 50); do scrape; done | median)
v=$(for _ in $(seq 20); do version; done | median)
after=$(rss_kib "$pid")
printf 'metrics scrape (median of 50, new TLS connection each): %.1f ms; osctl version (median of 20, reference) %.1f ms\n' \
  "$(echo "$m * 1000" | bc -l)" "$(echo "$v * 1000" | bc -l)"
printf 'machined RSS: %d KiB idle with etcd, %d KiB after the scrapes\n' "$idle" "$after"
kill "$pid" 2>/dev/null || true
pkill -f -- "$out/node" 2>/dev/null || true
