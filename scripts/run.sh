#!/usr/bin/env bash
# The main job: a local cluster of real nodes in QEMU, end to end.
#   1. build osctl, machined, init and imager (release), and Kubernetes
#      v1.35.4 and CoreDNS from their Go modules (scripts/build-kubernetes.sh
#      --coredns; cached, a warm run takes seconds) into _out/kubernetes,
#      so the image bakes the CoreDNS container image too;
#   2. `osctl cluster create`: bake the qemu image from the locked, verified
#      packages and those binaries, boot CONTROLPLANES VMs (default 3) on a
#      private network, generate the PKI and configs, apply them through
#      maintenance mode, bootstrap etcd and wait until every node is
#      healthy (etcd, kube-apiserver, kube-controller-manager,
#      kube-scheduler) and every API server answers /readyz through its
#      forwarded port;
#   3. show the cluster, its services, etcd members and a node's boot
#      timeline, check etcd with etcdctl through a forwarded port, write
#      the admin kubeconfig with `osctl kubeconfig` and ask the API server
#      `kubectl get --raw /readyz` through the forwarded port;
#   4. destroy it (KEEP_RUNNING=1 leaves it up for you to explore).
# Without Go (no Kubernetes build) the cluster runs etcd and containerd
# only, and step 3 says so. Under TCG (no KVM) on 2 cores, 3 control planes
# take 4 to 15 minutes to /readyz (depending on what else the host does),
# 1 (CONTROLPLANES=1) 1.5 to 2.5.
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

step "create a ${CONTROLPLANES:-3}-node cluster (image from profiles/qemu.yaml)"
"$osctl" cluster create --name "$name" --controlplanes "${CONTROLPLANES:-3}" \
  --profile profiles/qemu.yaml "${kube_args[@]}" --osconfig "$OSCONFIG" \
  --wait "${WAIT:-1500}"

step "the cluster, its services and etcd members"
"$osctl" cluster show --name "$name"
"$osctl" services --context "$name"
"$osctl" etcd members --context "$name"

step "the first node's boot timeline (guest uptime of each phase)"
first=$(python3 -c "import json,sys; print('127.0.0.1:%d' % json.load(open(sys.argv[1]))['nodes'][0]['api_port'])" "$OSCTL_CLUSTERS/$name/cluster.json")
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
else
  step "no kubectl from the Kubernetes build: skipping the control-plane checks"
fi

if [ "${KEEP_RUNNING:-0}" = 1 ]; then
  step "the cluster keeps running: OSCONFIG=$OSCONFIG OSCTL_CLUSTERS=$OSCTL_CLUSTERS $osctl health --context $name ; remove it with: $osctl cluster destroy --name $name"
else
  step "destroy the cluster"
  "$osctl" cluster destroy --name "$name"
fi
