#!/usr/bin/env bash
# What the supply-chain checks cost, each against its reference in the same
# run (not part of the test run):
#   warm build:  imager build of profiles/qemu.yaml with a warm cache,
#                this imager (every cache read verified, tree listing, SBOM,
#                bundle) against the imager of REF (default 014c922, before
#                cache verification), built from that commit into a
#                worktree; runs alternate, 3 each, medians printed.
#   rebuild:     imager verify --rebuild of that build against a plain
#                imager build (3 alternating runs each).
# Both sides use the same machined, init and pause (target/image/release).
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="bc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
REF=${REF:-014c922}
RUNS=${RUNS:-3}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/ref" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

cargo build --release --locked -p imager
new=target/release/imager
# Our binaries once, through imager (paths remapped), for both sides.
$new build -q profiles/qemu.yaml -o "$work/warm" --no-kubernetes >/dev/null
bins=(--machined target/image/release/machined --init target/image/release/init --pause target/image/release/pause)

git worktree add --detach "$work/ref" "$REF" >/dev/null
# Its own target dir, kept between runs (the reference never changes).
(cd "$work/ref" && cargo build --release --locked -p imager -q --target-dir "$OLDPWD/target/bench-ref")
old="$PWD/target/bench-ref/release/imager"
# Both sides build the reference's profile and lock (one suite): the old
# imager cannot read the newer profile format.
ref_profile="$work/ref/profiles/qemu.yaml"
# The reference keeps its own cache: this imager removes the unpacked
# entries of the older format (no recorded digest) that the reference
# writes, which would make every reference run a cold one.
cache=${IMAGER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imager}
mkdir -p "$work/old-cache"
cp -r "$cache/sha256" "$work/old-cache/"
old_env=(env IMAGER_CACHE="$work/old-cache")
"${old_env[@]}" $old build -q "$ref_profile" -o "$work/old-warm" "${bins[@]}" --no-kubernetes >/dev/null
$new build -q "$ref_profile" -o "$work/new-warm" "${bins[@]}" --no-kubernetes >/dev/null

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_of() { local t0; t0=$(now); "$@" >/dev/null; echo "$(now) - $t0" | bc; }

old_t=(); new_t=()
for i in $(seq "$RUNS"); do
  old_t+=("$(time_of "${old_env[@]}" "$old" build -q "$ref_profile" -o "$work/old-$i" "${bins[@]}" --no-kubernetes)")
  new_t+=("$(time_of "$new" build -q "$ref_profile" -o "$work/new-$i" "${bins[@]}" --no-kubernetes)")
  rm -rf "$work/old-$i" "$work/new-$i"
done
old_m=$(printf '%s\n' "${old_t[@]}" | median)
new_m=$(printf '%s\n' "${new_t[@]}" | median)

# Cache verification alone: hashing every cached .deb and unpacked tree.
hash_t=$(time_of sh -c "cat '$cache'/sha256/* '$cache'/unpacked/*.data.tar | sha256sum")
cache_mib=$(du -cm "$cache"/sha256 "$cache"/unpacked | tail -1 | cut -f1)

$new build -q profiles/qemu.yaml -o "$work/base" "${bins[@]}" --no-kubernetes >/dev/null
plain_t=(); rebuild_t=()
for i in $(seq "$RUNS"); do
  plain_t+=("$(time_of "$new" build -q profiles/qemu.yaml -o "$work/p-$i" "${bins[@]}" --no-kubernetes)")
  rebuild_t+=("$(time_of "$new" verify "$work/base/manifest.json" --rebuild -o "$work/r-$i" "${bins[@]}")")
  rm -rf "$work/p-$i" "$work/r-$i"
done
plain_m=$(printf '%s\n' "${plain_t[@]}" | median)
rebuild_m=$(printf '%s\n' "${rebuild_t[@]}" | median)

printf '%-66s %8.2f s  (runs: %s)\n' "warm build, imager $REF (no cache verification)" "$old_m" "${old_t[*]}"
printf '%-66s %8.2f s  (runs: %s)\n' "warm build, this imager (verified caches, listing, SBOM, bundle)" "$new_m" "${new_t[*]}"
printf '%-66s %8.2fx\n' "ratio this / $REF" "$(echo "$new_m / $old_m" | bc -l)"
printf '%-66s %8.2f s  (%s MiB, one core, sha256sum)\n' "hashing the whole cache once (what verification reads)" "$hash_t" "$cache_mib"
printf '%-66s %8.2f s  (runs: %s)\n' "plain build" "$plain_m" "${plain_t[*]}"
printf '%-66s %8.2f s  (runs: %s)\n' "imager verify --rebuild (check, rebuild, compare)" "$rebuild_m" "${rebuild_t[*]}"
printf '%-66s %8.2fx\n' "ratio verify --rebuild / plain build" "$(echo "$rebuild_m / $plain_m" | bc -l)"
size() { stat -c %s "$1" | awk '{printf "%.1f MiB", $1/1048576}'; }
printf '%-66s %s\n' "SBOM (CycloneDX 1.5 JSON)" "$(size "$work/base/qemu-sbom.cdx.json"), $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d["components"]; print(len(c), "components,", sum(len(x.get("components",[])) for x in c), "files")' "$work/base/qemu-sbom.cdx.json")"
printf '%-66s %s\n' "tree listing" "$(wc -l < "$work/base/qemu-tree.txt") entries"
printf '%-66s %s\n' "upgrade bundle" "$(size "$work/base/qemu-upgrade.tar")"
