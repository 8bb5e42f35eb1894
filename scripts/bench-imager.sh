#!/usr/bin/env bash
# Image build speed against a reference pipeline over the same packages,
# measured in the same run (not part of the test run):
#   ours:      imager build profiles/qemu.yaml (verify, unpack, filter,
#              ELF closure, cpio + zstd, squashfs, ESP, GPT, manifest)
#   reference: dpkg-deb -x of every locked .deb, then
#              find | sort | cpio -o -H newc --reproducible | zstd -3 -T2
#   incremental: imager build again after changing only machined
# Both start from the same downloaded, verified .debs (download excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="cpio zstd bc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p imager -p machined --bins
profile=profiles/qemu.yaml
[ -f profiles/qemu.lock ] || ./target/release/imager lock "$profile"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cache=${IMAGER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imager}

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

# Warm the package cache so neither side pays for downloads.
./target/release/imager build -q "$profile" -o "$work/warm" >/dev/null

# Cold: no cached decompressed packages (what a first build pays).
rm -rf "$cache/unpacked"
t0=$(now)
./target/release/imager build -q "$profile" -o "$work/cold" >/dev/null
t1=$(now)
cold=$(secs "$t0" "$t1")

# Warm: every output (initramfs, squashfs, ESP, GPT disk, manifest).
t0=$(now)
./target/release/imager build -q "$profile" -o "$work/ours" >/dev/null
t1=$(now)
ours=$(secs "$t0" "$t1")

# Same job as the reference: the initramfs only, cold.
sed 's/^outputs: .*/outputs: [initramfs]/' "$profile" > "$work/initramfs-only.yaml"
cp profiles/qemu.lock "$work/initramfs-only.lock"
rm -rf "$cache/unpacked"
t0=$(now)
./target/release/imager build -q "$work/initramfs-only.yaml" -o "$work/initrd-cold" >/dev/null
t1=$(now)
initrd_cold=$(secs "$t0" "$t1")
t0=$(now)
./target/release/imager build -q "$work/initramfs-only.yaml" -o "$work/initrd-warm" >/dev/null
t1=$(now)
initrd_warm=$(secs "$t0" "$t1")

mkdir -p "$work/ref/root"
t0=$(now)
grep -E '^\s+sha256:' profiles/qemu.lock | awk '{print $2}' | while read -r h; do
  dpkg-deb -x "$cache/sha256/$h" "$work/ref/root"
done
(cd "$work/ref/root" && find . | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | zstd -q -3 -T2 > "$work/ref/ref.cpio.zst")
t1=$(now)
ref=$(secs "$t0" "$t1")

# Incremental: a different machined (one byte appended), everything else the same.
cp target/release/machined "$work/machined"
printf '\0' >> "$work/machined"
t0=$(now)
./target/release/imager build -q "$profile" -o "$work/incr" --machined "$work/machined" >/dev/null
t1=$(now)
incr=$(secs "$t0" "$t1")

size() { stat -c %s "$1" | awk '{printf "%.1f MiB", $1/1048576}'; }
printf '%-60s %8.2f s\n' "reference: dpkg-deb -x + find|cpio|zstd -3 (initramfs)" "$ref"
printf '%-60s %8.2f s   (%.2fx the reference speed)\n' "imager, initramfs only, cold (xz unpack)" "$initrd_cold" "$(echo "$ref / $initrd_cold" | bc -l)"
printf '%-60s %8.2f s   (%.2fx)\n' "imager, initramfs only, warm (unpacked-package cache)" "$initrd_warm" "$(echo "$ref / $initrd_warm" | bc -l)"
printf '%-60s %8.2f s\n' "imager, all outputs (initramfs, squashfs, ESP, disk), cold" "$cold"
printf '%-60s %8.2f s\n' "imager, all outputs, warm" "$ours"
printf '%-60s %8.2f s\n' "incremental rebuild after changing machined (all outputs)" "$incr"
printf '%-60s %s\n' "our initramfs (filtered, ELF-closed)" "$(size "$work/ours/qemu-initramfs.cpio.zst")"
printf '%-60s %s\n' "reference initramfs (everything unpacked)" "$(size "$work/ref/ref.cpio.zst")"
printf '%-60s %s\n' "our disk image (raw, sparse: apparent size)" "$(size "$work/ours/qemu-disk.raw")"
printf '%-60s %s\n' "our kernel" "$(size "$work/ours/qemu-vmlinuz")"
