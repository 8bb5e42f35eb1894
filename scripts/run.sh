#!/usr/bin/env bash
# The main job: build osctl, generate a cluster's PKI and machine configs,
# and validate every generated file. Output goes to ./_out/ (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release -p osctl
out=${OUT:-_out}
mkdir -p "$out"
./target/release/osctl gen config "${CLUSTER_NAME:-demo}" "${ENDPOINT:-https://10.5.0.2:6443}" \
  --output-dir "$out" --force
./target/release/osctl validate -f "$out/secrets.yaml" -f "$out/controlplane.yaml" \
  -f "$out/worker.yaml" -f "$out/osconfig"
