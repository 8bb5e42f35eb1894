#!/usr/bin/env bash
# Benchmarks with in-run references (not part of the test run):
#   API latency of machined over mTLS (reused / new connections) and its idle RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p machined -p osctl
cargo bench -p node-tests --bench api_latency
