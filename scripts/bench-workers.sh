#!/usr/bin/env bash
# Worker figures under TCG, each beside a reference measured in the same
# run (not part of the test run; QEMU, 1 control plane + 2 workers):
#   - `osctl cluster create` to every node Ready, against create to the
#     control plane's /readyz (from create's own timestamps);
#   - pod start latency on a worker (creation to Running, from the pod's
#     own timestamps), against the API round trip of `kubectl get` from
#     this host;
#   - pod-to-pod throughput across the two workers (over the routes machined
#     programs), against host-to-host between the same VMs (hostNetwork
#     pods on the same two workers).
# PODS=N pods for the latency median (default 5); MIB=N MiB per transfer
# (default 64). KEEP_RUNNING=1 leaves the cluster up.
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="qemu-system-x86 ovmf curl bc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -q -p osctl -p machined -p imager --bins
osctl=$PWD/target/release/osctl
out=$PWD/${OUT:-_out}/bench-workers
mkdir -p "$out"
scripts/build-kubernetes.sh --coredns "$out/kube" >/dev/null
export OSCTL_CLUSTERS=$out/clusters OSCONFIG=$out/osconfig
name=bench
"$osctl" cluster destroy --name "$name" >/dev/null 2>&1 || true
trap '[ "${KEEP_RUNNING:-0}" = 1 ] || "$osctl" cluster destroy --name "$name" >/dev/null 2>&1 || true' EXIT

t0=$(date +%s.%N)
"$osctl" cluster create --name "$name" --controlplanes 1 --workers 2 --accel tcg \
  --profile profiles/qemu.yaml --kubernetes-dir "$out/kube" --wait 1500 2>&1 | tee "$out/create.log" |
  grep -E 'Kubernetes API ready|is healthy|generated|wrote' || true
healthy=$(echo "$(date +%s.%N) - $t0" | bc)
readyz=$(sed -n 's/^\[ *\([0-9.]*\)s\].*Kubernetes API ready.*/\1/p' "$out/create.log" | head -1)
"$osctl" kubeconfig --context "$name" "$out/kubeconfig" --force >/dev/null
k=("$out/kube/kubectl" --kubeconfig "$out/kubeconfig" --request-timeout 60s)
until [ "$("${k[@]}" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)" -ge 2 ]; do sleep 2; done
all_ready=$(echo "$(date +%s.%N) - $t0" | bc)
printf '\ncluster create (1 control plane, 2 workers, TCG)\n'
printf '  to control-plane /readyz (reference)   %7.1f s (create log)\n' "${readyz:-0}"
printf '  to every node healthy (create returns) %7.1f s\n' "$healthy"
printf '  to every node Ready                    %7.1f s\n' "$all_ready"

# Pod start latency.
pods=${PODS:-5}
lat=()
for i in $(seq "$pods"); do
  "${k[@]}" run "lat-$i" --image localhost/node-os/busybox:1 --image-pull-policy Never \
    --overrides '{"spec":{"nodeName":"bench-w1"}}' --restart Never -- sleep 3600 >/dev/null
  "${k[@]}" wait --for=condition=Ready "pod/lat-$i" --timeout 300s >/dev/null
  c=$("${k[@]}" get pod "lat-$i" -o jsonpath='{.metadata.creationTimestamp}')
  s=$("${k[@]}" get pod "lat-$i" -o jsonpath='{.status.containerStatuses[0].state.running.startedAt}')
  lat+=("$(( $(date -d "$s" +%s) - $(date -d "$c" +%s) ))")
  "${k[@]}" delete pod "lat-$i" --wait=false >/dev/null
done
ref=()
for i in $(seq "$pods"); do
  a=$(date +%s.%N); "${k[@]}" get node bench-w1 >/dev/null; ref+=("$(echo "$(date +%s.%N) - $a" | bc)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\npod start on a worker, creation to Running (%s pods, 1 s resolution)\n' "$pods"
printf '  median %s s (all: %s)\n' "$(median "${lat[@]}")" "${lat[*]}"
printf '  reference: kubectl get from this host, median %.2f s\n' "$(median "${ref[@]}")"

# Throughput: a receiver and a sender on different workers, once over the
# pod network, once with the nodes' own addresses (hostNetwork).
mib=${MIB:-64}
pair() { # NAME HOSTNETWORK
  for side in recv:bench-w1 send:bench-w2; do
    "${k[@]}" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1-${side%%:*}}
spec:
  nodeName: ${side#*:}
  hostNetwork: $2
  containers:
    - {name: c, image: localhost/node-os/busybox:1, imagePullPolicy: Never, command: [sleep, "3600"]}
YAML
  done
  "${k[@]}" wait --for=condition=Ready "pod/$1-recv" "pod/$1-send" --timeout 300s >/dev/null
}
transfer() { # NAME PORT -> seconds
  local ip
  ip=$("${k[@]}" get pod "$1-recv" -o jsonpath='{.status.podIP}')
  # The receiver counts what arrives: a transfer that did not connect
  # (its listener not up yet under emulation) is refused, not timed.
  "${k[@]}" exec "$1-recv" -- sh -c "nc -l -p $2 | busybox wc -c" > "$out/$1.bytes" &
  local rpid=$!
  sleep 15
  # Timed inside the sender from /proc/uptime (10 ms steps; busybox's date
  # has no %N), so kubectl's own overhead is not counted.
  "${k[@]}" exec "$1-send" -- sh -c "read a _ < /proc/uptime; busybox dd if=/dev/zero bs=1048576 count=$mib 2>/dev/null | nc -w 2 $ip $2; read b _ < /proc/uptime; echo \$(( (\${b%.*}\${b#*.} - \${a%.*}\${a#*.}) * 10 ))"
  wait "$rpid" 2>/dev/null || true
  local got
  got=$(tr -dc 0-9 < "$out/$1.bytes")
  if [ "${got:-0}" -ne $((mib * 1048576)) ]; then
    echo "transfer $1: the receiver got ${got:-0} of $((mib * 1048576)) bytes" >&2
    exit 1
  fi
}
pair pod false
pair host true
pod_ms=$(transfer pod 5001 | tail -1)
host_ms=$(transfer host 5002 | tail -1)
printf '\nthroughput, %s MiB from bench-w2 to bench-w1 (busybox nc)\n' "$mib"
printf '  pod to pod (machined routes)          %8.1f MiB/s (%s ms)\n' "$(echo "$mib * 1000 / $pod_ms" | bc -l)" "$pod_ms"
printf '  host to host (reference, same VMs)    %8.1f MiB/s (%s ms)\n' "$(echo "$mib * 1000 / $host_ms" | bc -l)" "$host_ms"
printf '  ratio pod/host                        %8.2f\n' "$(echo "$host_ms / $pod_ms" | bc -l)"
