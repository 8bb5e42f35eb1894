#!/usr/bin/env bash
# Boot and cluster-creation speed under TCG, with references measured in the
# same run (not part of the test run; figures vary with host load):
#   reference: our kernel with a busybox-only initramfs; guest uptime when
#              its /init runs (the floor for "init started");
#   ours:      guest uptime of each boot phase from `osctl boot`, for a
#              first boot (formats STATE and EPHEMERAL, config via the
#              maintenance API) and a reboot with the config on disk (API
#              answering, etcd healthy);
#   wall time of `osctl cluster create` for 1 and 3 nodes (VMs in parallel
#              on this host's cores), with an image without Kubernetes;
#   with Kubernetes (the source build, scripts/build-kubernetes.sh):
#              wall time of `osctl cluster create` to every API server's
#              /readyz through its forwarded port, for 1 and 3 control
#              planes, and where the time goes (guest uptime at which
#              etcd, kube-apiserver, kube-scheduler and
#              kube-controller-manager became healthy). KUBE=0 skips this
#              part (about 3 + 10 minutes on 2 cores).
# The hand-made etcd image floor (etcd healthy at ~3.1 s guest uptime,
# no TLS, no agent) is quoted from ../shared/REFERENCE.md, not re-measured.
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="qemu-system-x86 ovmf busybox-static cpio zstd ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p osctl -p machined -p imager --bins
osctl=$PWD/target/release/osctl
work=$(mktemp -d)
export OSCTL_CLUSTERS=$work/clusters OSCONFIG=$work/osconfig
cleanup() {
  for c in bench1 bench3 kube1 kube3; do "$osctl" cluster destroy --name $c >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
./target/release/imager build -q profiles/qemu.yaml -o "$work/image" --no-kubernetes >/dev/null

now() { date +%s.%N; }
py() { python3 -c "$@"; }

# --- reference: busybox-only initramfs on our kernel
mkdir -p "$work/bb/bin" "$work/bb/proc"
cp "$(command -v busybox)" "$work/bb/bin/busybox"
cat > "$work/bb/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "REFERENCE-INIT $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
INIT
chmod +x "$work/bb/init"
(cd "$work/bb" && find . | cpio -o -H newc --quiet | zstd -q -3 > "$work/bb.cpio.zst")
boot_once() { # initrd append -> serial log
  timeout 120 qemu-system-x86_64 -accel tcg -m 1024 -display none -monitor none -nodefaults \
    -no-reboot -serial "file:$3" -kernel "$work/image/qemu-vmlinuz" -initrd "$1" -append "$2" || true
}
boot_once "$work/bb.cpio.zst" "console=ttyS0 panic=-1 quiet" "$work/ref.log"
ref_init=$(tr -d '\r' < "$work/ref.log" | awk '/REFERENCE-INIT/ {print $2; exit}')
boot_once "$work/image/qemu-initramfs.cpio.zst" "console=ttyS0 panic=-1 quiet init.test=poweroff" "$work/ours.log"
our_init=$(tr -d '\r' < "$work/ours.log" | sed -n 's/^\[init *\([0-9.]*\)s\] init started.*/\1/p' | head -1)

# --- one node: first boot, then a reboot with the config on disk
t0=$(now)
"$osctl" cluster create --name bench1 --controlplanes 1 --image "$work/image" --accel tcg >/dev/null
create1=$(py "print(round($(now) - $t0, 1))")
state=$OSCTL_CLUSTERS/bench1/cluster.json
ep=$(py "import json; print('127.0.0.1:%d' % json.load(open('$state'))['nodes'][0]['api_port'])")
phase() { # json phase [detail-substring] -> uptime
  py "
import json,sys
marks=json.load(open('$1'))[0]['result']['marks']
for m in marks:
    if m['phase']=='$2' and '${3:-}' in m['detail']:
        print('%.2f' % m['uptime_seconds']); break
else: print('-')"
}
"$osctl" boot --context bench1 -n "$ep" -o json > "$work/first.json"
"$osctl" reboot --context bench1 -n "$ep" >/dev/null
sleep 5
for _ in $(seq 300); do
  "$osctl" health --context bench1 -n "$ep" >/dev/null 2>&1 && break
  sleep 1
done
"$osctl" boot --context bench1 -n "$ep" -o json > "$work/second.json"
"$osctl" boot --context bench1 -n "$ep"
"$osctl" cluster destroy --name bench1 >/dev/null

# --- three nodes
t0=$(now)
"$osctl" cluster create --name bench3 --controlplanes 3 --image "$work/image" --accel tcg >/dev/null
create3=$(py "print(round($(now) - $t0, 1))")
"$osctl" cluster destroy --name bench3 >/dev/null

api2=$(phase "$work/second.json" "API serving" "mutual")
etcd2=$(phase "$work/second.json" "etcd healthy")
ratio() { py "print('%.2fx' % ($1 / $2))" 2>/dev/null || echo "-"; }
echo
echo "Boot under TCG (guest uptime, seconds; $(nproc) host cores)"
printf '%-58s %8s  %s\n' "measurement" "ours" "vs reference"
printf '%-58s %8s  %s\n' "reference: busybox /init runs (same kernel, same run)" "$ref_init" "1.00x"
printf '%-58s %8s  %s\n' "init started (full initramfs, 71 MB)" "$our_init" "$(ratio "$our_init" "$ref_init")"
init2=$(phase "$work/second.json" "kernel handed over to init")
printf '%-58s %8s  %s\n' "init started (cluster VM: 2.4 MB boot initrd, root slot A)" "$init2" "$(ratio "$init2" "$ref_init")"
printf '%-58s %8s\n' "root ready (slot A squashfs mounted)" "$(phase "$work/second.json" "root ready")"
printf '%-58s %8s\n' "first boot: disks ready (formats STATE+EPHEMERAL)" "$(phase "$work/first.json" "disks ready")"
printf '%-58s %8s\n' "first boot: API serving (maintenance)" "$(phase "$work/first.json" "API serving" "maintenance")"
printf '%-58s %8s  %s\n' "reboot, config on disk: API answering (mutual TLS)" "$api2" "$(ratio "$api2" "$ref_init") of the init floor"
printf '%-58s %8s  %s\n' "reboot, config on disk: etcd healthy" "$etcd2" "$(ratio "$etcd2" 3.14) of the 3.14 s hand-made etcd image"
echo
echo "osctl cluster create, wall time (image prebuilt, TCG)"
printf '%-58s %8ss\n' "1 node (boot, apply, bootstrap, healthy)" "$create1"
printf '%-58s %8ss\n' "3 nodes (VMs share $(nproc) cores)" "$create3"

[ "${KUBE:-1}" = 1 ] || exit 0

# --- with Kubernetes: cluster create to /readyz, and where the time goes
scripts/build-kubernetes.sh "$work/kubernetes" >/dev/null
./target/release/imager build -q profiles/qemu.yaml -o "$work/kimage" --kubernetes-dir "$work/kubernetes" >/dev/null
kube_create() { # name controlplanes -> wall seconds; boot timelines in $work/NAME-I.json
  local t0 t1 state n
  t0=$(now)
  "$osctl" cluster create --name "$1" --controlplanes "$2" --image "$work/kimage" --accel tcg --wait 2400 >/dev/null 2>"$work/$1.log"
  t1=$(now)
  state=$OSCTL_CLUSTERS/$1/cluster.json
  for n in $(seq 0 $(($2 - 1))); do
    "$osctl" boot --context "$1" -n "$(py "import json; print('127.0.0.1:%d' % json.load(open('$state'))['nodes'][$n]['api_port'])")" -o json > "$work/$1-$n.json"
  done
  "$osctl" cluster destroy --name "$1" >/dev/null
  py "print(round($t1 - $t0, 1))"
}
kcreate1=$(kube_create kube1 1)
kcreate3=$(kube_create kube3 3)
echo
echo "osctl cluster create with Kubernetes v1.35.4 to /readyz through the forwarded port (image prebuilt, TCG)"
printf '%-58s %8ss\n' "1 control plane" "$kcreate1"
printf '%-58s %8ss\n' "3 control planes (VMs share $(nproc) cores)" "$kcreate3"
echo "where the time goes (guest uptime, seconds):"
printf '%-12s %8s %8s %15s %15s %24s\n' node etcd apiserver scheduler controller-mgr "(API mTLS)"
for f in kube1-0 kube3-0 kube3-1 kube3-2; do
  printf '%-12s %8s %8s %15s %15s %24s\n' "$f" "$(phase "$work/$f.json" "etcd healthy")" \
    "$(phase "$work/$f.json" "kube-apiserver healthy")" "$(phase "$work/$f.json" "kube-scheduler healthy")" \
    "$(phase "$work/$f.json" "kube-controller-manager healthy")" "$(phase "$work/$f.json" "API serving" "mutual")"
done
