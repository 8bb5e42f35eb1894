#!/usr/bin/env bash
# The main job: a local cluster of real nodes in QEMU, end to end.
#   1. build osctl, machined, init and imager (release), and Kubernetes
#      v1.35.4 and CoreDNS from their Go modules (scripts/build-kubernetes.sh
#      --coredns; cached, a warm run takes seconds) into _out/kubernetes,
#      so the image bakes the CoreDNS container image too;
#   2. `osctl cluster create`: bake the qemu image from the locked, verified
#      packages and those binaries, boot CONTROLPLANES control-plane VMs
#      (default 1) and WORKERS worker VMs (default 2) on a private network,
#      generate the PKI and configs, apply them through maintenance mode,
#      bootstrap etcd and wait until every node is healthy (etcd,
#      kube-apiserver, kube-controller-manager, kube-scheduler; containerd,
#      kubelet, kube-proxy) and every API server answers /readyz through
#      its forwarded port;
#   3. show the cluster, its services, etcd members and a node's boot
#      timeline, check etcd with etcdctl through a forwarded port, write
#      the admin kubeconfig with `osctl kubeconfig` and ask the API server
#      `kubectl get --raw /readyz` through the forwarded port;
#   4. the Hard Way's smoke test: every node Ready (`kubectl get nodes -o
#      wide`), a Deployment of the baked busybox with one pod per worker,
#      logs, exec, pod to pod across workers by IP, cluster DNS, a NodePort
#      from this host, and a Secret encrypted in etcd;
#   5. destroy it (KEEP_RUNNING=1 leaves it up for you to explore).
# Without Go (no Kubernetes build) the cluster runs etcd and containerd
# only, and step 3 says so. Under TCG (no KVM) on 2 cores, 1 control plane
# and 2 workers take about 5 minutes to healthy and 6 to every node Ready;
# 3 control planes (CONTROLPLANES=3 WORKERS=0) 4 to 15 minutes to /readyz
# (depending on what else the host does).
# Everything lives under _out/ (OUT=DIR to change). scripts/run-host.sh is
# the same flow with machined in host mode, without VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="qemu-system-x86 ovmf etcd-client ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p osctl -p machined -p imager --bins
osctl=$PWD/target/release/osctl
out=${OUT:-_out}
case $out in /*) ;; *) out=$PWD/$out ;; esac
name=${CLUSTER_NAME:-demo}
export OSCTL_CLUSTERS=$out/clusters
export OSCONFIG=$out/osconfig
mkdir -p "$out"

step() { printf '\n==> %s\n' "$*"; }

# The Hard Way's smoke test against the running cluster (workers needed).
smoke_test() {
  local k=("$kubectl" --kubeconfig "$out/kubeconfig" --request-timeout 30s)
  step "every node Ready"
  local want=$workers deadline=$((SECONDS + ${READY_WAIT:-900}))
  until [ "$("${k[@]}" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)" -ge "$want" ]; do
    [ $SECONDS -lt $deadline ] || { echo "nodes not Ready in time" >&2; "${k[@]}" get nodes -o wide; return 1; }
    sleep 5
  done
  "${k[@]}" get nodes -o wide
  step "a Deployment of the baked busybox, one pod per worker, and a NodePort service"
  "${k[@]}" apply -f tests/manifests/smoke-web.yaml
  "${k[@]}" rollout status deployment/web --timeout 600s
  "${k[@]}" get pods -o wide
  local a b bip
  a=$("${k[@]}" get pods -l app=web -o jsonpath='{.items[0].metadata.name}')
  b=$("${k[@]}" get pods -l app=web -o jsonpath='{.items[1].metadata.name}')
  bip=$("${k[@]}" get pods -l app=web -o jsonpath='{.items[1].status.podIP}')
  step "kubectl logs and exec"
  "${k[@]}" logs "$a"
  "${k[@]}" exec "$a" -- hostname
  step "pod $a -> pod $b ($bip) across workers, over the routes machined programmed"
  "${k[@]}" exec "$a" -- wget -q -T 10 -O - "http://$bip:8080/"
  step "cluster DNS from a pod"
  "${k[@]}" -n kube-system rollout status deployment/coredns --timeout 300s
  "${k[@]}" exec "$a" -- nslookup kubernetes.default.svc.cluster.local
  step "the NodePort from this host, through each worker's forwarded port"
  local port
  for port in $(python3 -c "import json,sys; print(' '.join(str(n['node_port']) for n in json.load(open(sys.argv[1]))['nodes'] if n.get('node_port')))" "$OSCTL_CLUSTERS/$name/cluster.json"); do
    printf '127.0.0.1:%s -> ' "$port"; curl -s -m 10 "http://127.0.0.1:$port/"
  done
  if command -v etcdctl >/dev/null; then
    step "a Secret, encrypted at rest in etcd"
    "${k[@]}" create secret generic smoke --from-literal=k=plain-text-value
    ETCDCTL_API=3 etcdctl --endpoints "https://127.0.0.1:$etcd_port" --cacert "$certs/ca.crt" \
      --cert "$certs/client.crt" --key "$certs/client.key" get /registry/secrets/default/smoke --print-value-only | head -c 33 | tr -c '[:print:]' '.'; echo
    echo "(the stored value starts with the secretbox provider's prefix; the rest is ciphertext)"
  fi
  step "smoke test passed"
}

step "Kubernetes from its Go modules (scripts/build-kubernetes.sh)"
kube_args=()
kubectl=
if scripts/build-kubernetes.sh --coredns "$out/kubernetes"; then
  kube_args=(--kubernetes-dir "$out/kubernetes")
  kubectl=$out/kubernetes/kubectl
else
  # imager then tries its own order (the official tarball, the source
  # build); without any, the image has no Kubernetes and says so.
  echo "no Kubernetes build (see above): imager looks for the binaries itself"
fi

# A fresh cluster each run.
"$osctl" cluster destroy --name "$name" >/dev/null 2>&1 || true

controlplanes=${CONTROLPLANES:-1}
workers=${WORKERS:-2}
step "create a cluster of $controlplanes control-plane and $workers worker nodes (image from profiles/qemu.yaml)"
"$osctl" cluster create --name "$name" --controlplanes "$controlplanes" --workers "$workers" \
  --profile profiles/qemu.yaml "${kube_args[@]}" --osconfig "$OSCONFIG" \
  --wait "${WAIT:-1500}"

step "the cluster, its services and etcd members"
"$osctl" cluster show --name "$name"
"$osctl" services --context "$name"
# etcd runs on the control-plane nodes only (listed first).
first=$(python3 -c "import json,sys; print('127.0.0.1:%d' % json.load(open(sys.argv[1]))['nodes'][0]['api_port'])" "$OSCTL_CLUSTERS/$name/cluster.json")
"$osctl" etcd members --context "$name" -n "$first"

step "the first node's boot timeline (guest uptime of each phase)"
"$osctl" boot --context "$name" -n "$first"

if command -v etcdctl >/dev/null; then
  step "etcdctl through the first node's forwarded client port"
  etcd_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['nodes'][0]['etcd_port'])" "$OSCTL_CLUSTERS/$name/cluster.json")
  certs=$out/etcd-client
  "$osctl" gen etcd-client --with-secrets "$OSCTL_CLUSTERS/$name/secrets.yaml" -o "$certs" --force >/dev/null
  ETCDCTL_API=3 etcdctl --endpoints "https://127.0.0.1:$etcd_port" --cacert "$certs/ca.crt" \
    --cert "$certs/client.crt" --key "$certs/client.key" put hello world
  ETCDCTL_API=3 etcdctl --endpoints "https://127.0.0.1:$etcd_port" --cacert "$certs/ca.crt" \
    --cert "$certs/client.crt" --key "$certs/client.key" endpoint status -w table
fi

if [ -n "$kubectl" ]; then
  step "the control plane through the forwarded port: osctl kubeconfig, then kubectl"
  "$osctl" kubeconfig --context "$name" "$out/kubeconfig" --force
  grep 'server:' "$out/kubeconfig"
  "$kubectl" --kubeconfig "$out/kubeconfig" get --raw /readyz; echo
  "$kubectl" --kubeconfig "$out/kubeconfig" version
  "$kubectl" --kubeconfig "$out/kubeconfig" get --raw '/readyz?verbose' | grep -E 'etcd|check'
  "$kubectl" --kubeconfig "$out/kubeconfig" get namespaces
  if [ "$workers" -gt 0 ]; then
    smoke_test
  fi
else
  step "no kubectl from the Kubernetes build: skipping the control-plane checks"
fi

if [ "${KEEP_RUNNING:-0}" = 1 ]; then
  step "the cluster keeps running: OSCONFIG=$OSCONFIG OSCTL_CLUSTERS=$OSCTL_CLUSTERS $osctl health --context $name ; remove it with: $osctl cluster destroy --name $name"
else
  step "destroy the cluster"
  "$osctl" cluster destroy --name "$name"
fi
