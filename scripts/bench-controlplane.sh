#!/usr/bin/env bash
# Control-plane figures, each beside a reference measured in the same run
# (not part of the test run):
#   - the Kubernetes build: warm time (the cold time is printed by
#     scripts/build-kubernetes.sh when the cache is empty);
#   - host mode: time from apply to etcd healthy (reference), to
#     kube-apiserver /readyz, and to controller-manager and scheduler
#     healthy, from machined's boot timeline (where the time goes);
#   - RSS of machined (reference: idle in maintenance mode) and of each
#     component with the roles running;
#   - binary sizes of the Kubernetes build.
# RUNS=N repeats the apply→ready measurement (default 3; median printed).
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc curl bc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -q -p osctl -p machined
osctl=$PWD/target/release/osctl
machined=$PWD/target/release/machined
out=$PWD/${OUT:-_out}/bench-controlplane
ip=${NODE_IP:-127.0.9.1}
runs=${RUNS:-3}

t0=$(date +%s.%N)
scripts/build-kubernetes.sh "$out/kube" >/dev/null
warm=$(echo "$(date +%s.%N) - $t0" | bc)
kube=$out/kube
printf 'kubernetes build (warm cache): %.1f s\n' "$warm"
printf '%-26s %12s\n' binary bytes
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  printf '%-26s %12d\n' "$b" "$(stat -c %s "$kube/$b")"
done

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
mkdir -p "$out"
"$osctl" gen config bench "https://$ip:6443" --output-dir "$out/cluster" --force >/dev/null
export OSCONFIG=$out/cluster/osconfig
results=()
for run in $(seq "$runs"); do
  pkill -9 -f -- "$out/node" 2>/dev/null || true
  sleep 0.5
  rm -rf "$out/node"
  mkdir -p "$out/node"
  PATH="$kube:$PATH" setsid "$machined" --root "$out/node" --listen "$ip:50000" --hostname bench-cp \
    > "$out/node.log" 2>&1 < /dev/null &
  pid=$!
  for _ in $(seq 200); do grep -q '^token:' "$out/node.log" 2>/dev/null && break; sleep 0.05; done
  idle_rss=$(rss_kib "$pid")
  fp=$(awk '/^fingerprint:/ {print $2; exit}' "$out/node.log")
  token=$(awk '/^token:/ {print $2; exit}' "$out/node.log")
  start=$(date +%s.%N)
  "$osctl" apply-config --insecure --cert-fingerprint "$fp" --token "$token" -n "$ip" \
    -f "$out/cluster/controlplane.yaml" >/dev/null
  for _ in $(seq 200); do "$osctl" version -n "$ip" >/dev/null 2>&1 && break; sleep 0.05; done
  "$osctl" bootstrap -n "$ip" >/dev/null
  etcd_ready=""
  ready=""
  for _ in $(seq 3000); do
    now=$(date +%s.%N)
    if [ -z "$etcd_ready" ] && "$osctl" services -n "$ip" 2>/dev/null | grep -q '^etcd .*healthy'; then
      etcd_ready=$(echo "$now - $start" | bc)
    fi
    if curl -sf --max-time 2 --cacert "$out/node/system/secrets/kubernetes/ca.crt" \
        "https://$ip:6443/readyz" 2>/dev/null | grep -q '^ok'; then
      ready=$(echo "$now - $start" | bc)
      break
    fi
    sleep 0.1
  done
  "$osctl" health -n "$ip" --wait 120 >/dev/null 2>&1
  all=$(echo "$(date +%s.%N) - $start" | bc)
  printf 'run %d: apply→etcd healthy %.2f s (reference), →apiserver /readyz %.2f s (%.1fx), →all healthy %.2f s\n' \
    "$run" "$etcd_ready" "$ready" "$(echo "$ready / $etcd_ready" | bc -l)" "$all"
  results+=("$ready")
  if [ "$run" = "$runs" ]; then
    echo
    echo "where the time goes (machined's timeline, seconds since machined started):"
    "$osctl" boot -n "$ip" 2>/dev/null | grep -E 'PHASE|healthy|API serving|services started' || true
    echo
    sleep 5
    printf '%-26s %10s\n' process RSS_MiB
    printf '%-26s %10.1f   (reference: idle, maintenance mode)\n' "machined (idle)" "$(echo "$idle_rss/1024" | bc -l)"
    printf '%-26s %10.1f   (%.1fx idle)\n' "machined (roles running)" "$(echo "$(rss_kib "$pid")/1024" | bc -l)" \
      "$(echo "$(rss_kib "$pid") / $idle_rss" | bc -l)"
    for svc in etcd kube-apiserver kube-controller-manager kube-scheduler containerd; do
      spid=$(pgrep -f -- "^[^ ]*$svc( |$)" | head -1 || true)
      [ -n "$spid" ] && printf '%-26s %10.1f\n' "$svc" "$(echo "$(rss_kib "$spid")/1024" | bc -l)"
    done
  fi
  "$osctl" shutdown -n "$ip" >/dev/null 2>&1 || true
  sleep 2
  pkill -9 -f -- "$out/node" 2>/dev/null || true
done
median=$(printf '%s\n' "${results[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
printf '\napply→apiserver /readyz, median of %d: %.2f s\n' "$runs" "$median"
