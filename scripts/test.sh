#!/usr/bin/env bash
# The test command: formatting, lints, and every test of the workspace
# (unit tests and integration tests that start real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
# Real node parts for the integration tests (Debian packages).
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc qemu-system-x86 ovmf cpio gdisk mtools squashfs-tools dosfstools zstd ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo nextest run --workspace --locked --no-fail-fast
