#!/usr/bin/env bash
# The test command: formatting, lints, and every test of the workspace
# (unit tests and integration tests that start real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
# This is what CI runs: a test whose tool, mirror or firmware is missing
# fails here instead of skipping (machine_api::testing). A caller's own
# CI=... is kept.
export CI="${CI:-1}"
# Real node parts for the integration tests (Debian packages).
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc qemu-system-x86 ovmf cpio gdisk mtools squashfs-tools dosfstools e2fsprogs zstd curl busybox-static python3-venv ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
# CI builds once: incremental caches would only add gigabytes to target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# The build and the disk-image tests need room; a full disk shows up later
# as confusing ENOSPC failures in unrelated tests, so say it up front.
mkdir -p target
free_kib=$(df -Pk target | awk 'NR==2 {print $4}')
if [ "${free_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kib / 1024)) MiB free for target/ and temporary files; the suite needs about 8 GiB" >&2
fi
# Python checkers for the tests (imager/tests/sbom_validates.rs runs
# cyclonedx-python-lib's strict CycloneDX 1.5 schema validator,
# tests/tests/metrics.rs prometheus_client's parsers), in a virtualenv of
# their own.
if [ ! -x target/pyenv/bin/python ]; then
  python3 -m venv target/pyenv
fi
if ! target/pyenv/bin/python -c 'import cyclonedx.validation.json, jsonschema' 2>/dev/null; then
  target/pyenv/bin/pip install --quiet 'cyclonedx-python-lib[json-validation]==11.12.0'
fi
# tests/tests/metrics.rs parses machined's metrics with the Prometheus
# project's own parsers.
if ! target/pyenv/bin/python -c 'import prometheus_client.parser, prometheus_client.openmetrics.parser' 2>/dev/null; then
  target/pyenv/bin/pip install --quiet 'prometheus-client==0.23.1'
fi
export PYTHON_CHECKERS="$PWD/target/pyenv/bin/python"
# Kubernetes built from the pinned Go modules, for the control-plane tests
# (cached outside the work tree, keyed by release and go.sum: a warm run
# takes seconds, a cold one about 13 minutes on 2 cores).
scripts/build-kubernetes.sh --coredns target/kubernetes
export KUBE_BIN_DIR="$PWD/target/kubernetes"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
cargo nextest run --workspace --locked --no-fail-fast
