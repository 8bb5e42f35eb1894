#!/usr/bin/env bash
# Regenerates the reference material that comes from the code.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p osctl
./target/debug/osctl docs schema > docs/machine-config.schema.json
./target/debug/osctl docs config-reference > docs/config-reference.md
echo "regenerated docs/machine-config.schema.json and docs/config-reference.md"
