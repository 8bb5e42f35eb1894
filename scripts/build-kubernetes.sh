#!/usr/bin/env bash
# Builds the Kubernetes node and control-plane binaries (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl) for
# linux/amd64 from the Go modules pinned by kubernetes/go.mod and go.sum,
# reproducibly: static (CGO_ENABLED=0), -trimpath, no build id, upstream's
# build tags and version stamps (hack/lib/version.sh in k8s.io/kubernetes),
# and a buildDate from SOURCE_DATE_EPOCH, else the release's module time.
# With --coredns it also builds CoreDNS from kubernetes/coredns/ (the same
# way: upstream's flags, stamps from that directory's release.env).
#
#   scripts/build-kubernetes.sh [--coredns] [OUT_DIR]
#
# The binaries land in a cache outside the work tree, keyed by the release
# and go.sum:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/osbuild/kubernetes/<version>-<sha256(go.sum):12>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/osbuild/coredns/<version>-<sha256(go.sum):12>/
# each with a SHA256SUMS file and a BUILDINFO file (toolchain, flags,
# inputs). A warm run (every binary present, SHA256SUMS matching, same
# BUILDINFO) builds nothing. With OUT_DIR the binaries are then hard-linked
# (else copied) into OUT_DIR, with one SHA256SUMS for all of them and the
# Kubernetes set's BUILDINFO (CoreDNS': BUILDINFO.coredns), which `imager
# build --kubernetes-dir` checks against the profile's version.
#
# Environment: OSBUILD_CACHE (cache root instead of the default),
# SOURCE_DATE_EPOCH (buildDate), GOCACHE/GOMODCACHE as usual for go.
# Go is `command -v go`, else /usr/local/go/bin/go; modules come from the
# machine's own GOPROXY.
set -euo pipefail

prog=build-kubernetes
usage() { echo "usage: $0 [--coredns] [OUT_DIR]" >&2; exit 2; }
with_coredns=0
out_dir=
while [ $# -gt 0 ]; do
  case $1 in
    --coredns) with_coredns=1 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [ -z "$out_dir" ] || usage; out_dir=$1 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
case $out_dir in ''|/*) ;; *) out_dir=$PWD/$out_dir ;; esac

die() { echo "$prog: $*" >&2; exit 1; }
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

GO=$(command -v go || true)
[ -n "$GO" ] || GO=/usr/local/go/bin/go
[ -x "$GO" ] || die "no Go toolchain (not on PATH, not at /usr/local/go/bin/go)"

# One environment for every go command: the same flags whatever the
# caller's GOFLAGS, no workspace, no toolchain switching.
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOWORK=off GOTOOLCHAIN=local
export CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOAMD64=v1

t_start=$(now)
cache_base=${OSBUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/osbuild}
go_version=$("$GO" env GOVERSION)
outputs=()   # "cache_dir binary" for the OUT_DIR step
buildinfos=()   # "set_name cache_dir" for the OUT_DIR step

go_env="go=$go_version GOOS=$GOOS GOARCH=$GOARCH GOAMD64=$GOAMD64 CGO_ENABLED=$CGO_ENABLED GOEXPERIMENT=$("$GO" env GOEXPERIMENT)"

# build_set NAME VERSION TAGS LDFLAGS STAMPS PKG:BIN... (run in the
# module's directory): the binaries into the cache unless warm there.
# BUILDINFO is STAMPS plus everything else that goes into the binaries.
build_set() {
  local name=$1 version=$2 tags=$3 ldflags=$4 info=$5
  shift 5
  local specs=("$@") bins=() s b t tmp
  for s in "${specs[@]}"; do bins+=("${s#*:}"); done
  local gosum_sha cache_root key dest
  gosum_sha=$(sha256sum go.sum | cut -c1-64)
  cache_root=$cache_base/$name
  key=$version-${gosum_sha:0:12}
  dest=$cache_root/$key
  info+=$'\n'"$go_env"$'\n'"tags=$tags"$'\n'"ldflags=$ldflags"
  info+=$'\n'"go.mod=$(sha256sum go.mod | cut -c1-64)"$'\n'"go.sum=$gosum_sha"$'\n'"binaries=${bins[*]}"
  for b in "${bins[@]}"; do outputs+=("$dest $b"); done
  buildinfos+=("$name $dest")

  mkdir -p "$cache_root"
  # One build per cache at a time; a second caller waits, then finds it warm.
  exec 9>"$cache_root/.lock"
  command -v flock >/dev/null 2>&1 && flock 9

  local t_set warm=1
  t_set=$(now)
  if [ -f "$dest/SHA256SUMS" ] && [ -f "$dest/BUILDINFO" ] &&
     [ "$(cat "$dest/BUILDINFO")" = "$info" ]; then
    for b in "${bins[@]}"; do
      grep -q "  $b\$" "$dest/SHA256SUMS" || warm=0
    done
    [ $warm = 1 ] && (cd "$dest" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1) || warm=0
  else
    warm=0
  fi
  if [ $warm = 1 ]; then
    echo "$prog: warm: $name $version (${bins[*]}) already built and verified in $dest ($(elapsed "$t_set")s)"
    exec 9>&-
    return
  fi

  echo "$prog: cold: building $name $version (${bins[*]}; $go_version, $GOOS/$GOARCH) into $dest"
  t=$(now)
  nice -n 10 "$GO" mod download
  echo "$prog: modules downloaded/verified ($(elapsed "$t")s)"
  tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
  trap "rm -rf '$tmp'" EXIT
  for s in "${specs[@]}"; do
    b=${s#*:}
    t=$(now)
    nice -n 10 "$GO" build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp/$b" "${s%%:*}"
    echo "$prog: built $b ($(elapsed "$t")s, $(stat -c %s "$tmp/$b") bytes)"
  done
  (cd "$tmp" && sha256sum "${bins[@]}" > SHA256SUMS)
  printf '%s\n' "$info" > "$tmp/BUILDINFO"
  chmod 0755 "$tmp"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
  exec 9>&-
  echo "$prog: cold build of $name done in $(elapsed "$t_set")s"
}

# --- Kubernetes -----------------------------------------------------------
cd "$root/kubernetes"
# shellcheck source=../kubernetes/release.env
. ./release.env
mod_version=$("$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)
[ "$mod_version" = "$KUBE_VERSION" ] ||
  die "kubernetes/go.mod requires k8s.io/kubernetes $mod_version but kubernetes/release.env is for $KUBE_VERSION (update KUBE_VERSION and KUBE_GIT_COMMIT)"
[[ $KUBE_VERSION =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "not a release version: $KUBE_VERSION"
git_major=${BASH_REMATCH[1]}
git_minor=${BASH_REMATCH[2]}
[[ $KUBE_GIT_COMMIT =~ ^[0-9a-f]{40}$ ]] || die "KUBE_GIT_COMMIT is not a commit hash: $KUBE_GIT_COMMIT"
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  build_date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
else
  build_date=$("$GO" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
fi
# What upstream's release build sets (hack/lib/golang.sh, version.sh).
ldflags="-s -w -buildid="
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$git_major -X $pkg.gitMinor=$git_minor"
  ldflags+=" -X $pkg.gitCommit=$KUBE_GIT_COMMIT -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done
specs=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  specs+=("k8s.io/kubernetes/cmd/$b:$b")
done
build_set kubernetes "$KUBE_VERSION" selinux,notest,grpcnotrace "$ldflags" \
  "$(echo "version=$KUBE_VERSION"; echo "gitCommit=$KUBE_GIT_COMMIT"; echo "buildDate=$build_date")" \
  "${specs[@]}"

# --- CoreDNS --------------------------------------------------------------
if [ $with_coredns = 1 ]; then
  cd "$root/kubernetes/coredns"
  # shellcheck source=../kubernetes/coredns/release.env
  . ./release.env
  mod_version=$("$GO" list -m -f '{{.Version}}' github.com/coredns/coredns)
  [ "$mod_version" = "$COREDNS_VERSION" ] ||
    die "kubernetes/coredns/go.mod requires CoreDNS $mod_version but its release.env is for $COREDNS_VERSION"
  # What upstream's Makefile sets (CoreDNS stamps no version or date).
  build_set coredns "$COREDNS_VERSION" "" \
    "-s -w -buildid= -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_GIT_COMMIT" \
    "$(echo "version=$COREDNS_VERSION"; echo "gitCommit=$COREDNS_GIT_COMMIT")" \
    github.com/coredns/coredns:coredns
fi

if [ -n "$out_dir" ]; then
  mkdir -p "$out_dir"
  : > "$out_dir/SHA256SUMS.tmp"
  copied=()
  for o in "${outputs[@]}"; do
    d=${o% *}; b=${o#* }
    rm -f "$out_dir/$b"
    ln "$d/$b" "$out_dir/$b" 2>/dev/null || { cp "$d/$b" "$out_dir/$b"; copied+=("$b"); }
    grep "  $b\$" "$d/SHA256SUMS" >> "$out_dir/SHA256SUMS.tmp"
  done
  mv "$out_dir/SHA256SUMS.tmp" "$out_dir/SHA256SUMS"
  for o in "${buildinfos[@]}"; do
    n=${o%% *}; d=${o#* }
    f=BUILDINFO; [ "$n" = kubernetes ] || f=BUILDINFO.$n
    cp "$d/BUILDINFO" "$out_dir/$f.tmp" && mv "$out_dir/$f.tmp" "$out_dir/$f"
  done
  # Hard links are the verified cache files; copies are checked again.
  if [ ${#copied[@]} -gt 0 ]; then
    (cd "$out_dir" && grep -E "  ($(IFS='|'; echo "${copied[*]}"))\$" SHA256SUMS | sha256sum --quiet --strict -c -) ||
      die "copies in $out_dir do not match SHA256SUMS"
  fi
  echo "$prog: ${#outputs[@]} binaries and SHA256SUMS in $out_dir"
fi
echo "$prog: total $(elapsed "$t_start")s"
