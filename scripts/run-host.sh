#!/usr/bin/env bash
# The main job, end to end on this machine:
#   1. generate a cluster's PKI, machine configs and client file (_out/cluster),
#      and validate every generated file;
#   2. run a node in host mode (machined with real containerd and etcd, state
#      under _out/node), configure it through the maintenance API with the
#      pinned fingerprint and one-time token, bootstrap etcd, wait until
#      healthy, and show its services and etcd members;
#   3. shut the node down (KEEP_RUNNING=1 leaves it up for you to explore).
# Booting real images in QEMU (`osctl cluster create`) comes with the image
# and boot work.
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p osctl -p machined
osctl=$PWD/target/release/osctl
machined=$PWD/target/release/machined
out=$PWD/${OUT:-_out}
ip=${NODE_IP:-127.0.0.2}

step() { printf '\n==> %s\n' "$*"; }

step "generate the cluster's secrets, machine configs and client file"
mkdir -p "$out/cluster"
keep=()
[ -f "$out/cluster/secrets.yaml" ] && keep=(--with-secrets "$out/cluster/secrets.yaml")
"$osctl" gen config "${CLUSTER_NAME:-demo}" "https://$ip:6443" --output-dir "$out/cluster" --force "${keep[@]}" \
  --config-patch-controlplane '{machine: {hostname: demo-1}}'
"$osctl" validate -f "$out/cluster/secrets.yaml" "$out/cluster/controlplane.yaml" \
  "$out/cluster/worker.yaml" "$out/cluster/osconfig"

step "start a node in host mode on $ip (state in $out/node)"
# A fresh node each run: stop what an earlier run left behind.
pkill -9 -f -- "$out/node" 2>/dev/null || true
sleep 0.5
rm -rf "$out/node"
mkdir -p "$out/node"
setsid "$machined" --root "$out/node" --listen "$ip:50000" > "$out/node.log" 2>&1 < /dev/null &
for _ in $(seq 100); do grep -q '^token:' "$out/node.log" 2>/dev/null && break; sleep 0.1; done
sed -n '/^====/,/^====/p' "$out/node.log" | head -9
fp=$(awk '/^fingerprint:/ {print $2; exit}' "$out/node.log")
token=$(awk '/^token:/ {print $2; exit}' "$out/node.log")

step "apply controlplane.yaml through the maintenance API (pinned certificate + token)"
"$osctl" apply-config --insecure --cert-fingerprint "$fp" --token "$token" -n "$ip" \
  -f "$out/cluster/controlplane.yaml"
export OSCONFIG=$out/cluster/osconfig
for _ in $(seq 100); do "$osctl" version -n "$ip" >/dev/null 2>&1 && break; sleep 0.1; done

step "bootstrap etcd and wait until every service is healthy"
"$osctl" bootstrap -n "$ip"
"$osctl" health -n "$ip" --wait 90

step "services, etcd members, and a key written through etcd's own client"
"$osctl" services -n "$ip"
"$osctl" etcd members -n "$ip"
if command -v etcdctl >/dev/null; then
  certs=$out/node/system/secrets/etcd
  ETCDCTL_API=3 etcdctl --endpoints "https://$ip:2379" --cacert "$certs/ca.crt" \
    --cert "$certs/client.crt" --key "$certs/client.key" put hello world
fi

if [ "${KEEP_RUNNING:-0}" = 1 ]; then
  step "the node keeps running: OSCONFIG=$OSCONFIG $osctl services -n $ip ; stop it with: $osctl shutdown -n $ip"
else
  step "shut the node down (services stop in reverse dependency order)"
  "$osctl" shutdown -n "$ip"
  for _ in $(seq 150); do pgrep -f -- "$out/node" >/dev/null || break; sleep 0.2; done
  echo "done: files in $out/cluster, node log in $out/node.log"
fi
