#!/usr/bin/env bash
# Benchmarks with in-run references (not part of the test run):
#   API latency of machined over mTLS (reused / new connections) and its idle RSS;
#   machined under a flood of idle connections: connections held before the API
#   degrades, RSS and fds unloaded / under load / after load, version and apply
#   latency p50/p99 under the flood beside the unloaded figures (FLOOD_MAX=N sets
#   the largest flood, default 20000, bounded by this shell's open-files limit).
set -euo pipefail
cd "$(dirname "$0")/.."
export EXTRA_APT_PACKAGES="etcd-server etcd-client containerd runc ${EXTRA_APT_PACKAGES:-}"
source scripts/setup.sh
cargo build --release -p machined -p osctl
cargo bench -p node-tests --bench api_latency
cargo bench -p node-tests --bench connection_flood
