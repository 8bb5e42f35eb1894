#!/usr/bin/env bash
# Fuzzes machine-api's YAML readers (fuzz/fuzz_targets/parse_config.rs) for
# a bounded time. Not part of CI's test run.
#
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#
# Needs a nightly toolchain (cargo-fuzz builds with -Zsanitizer=address).
# A crash leaves its input in fuzz/artifacts/parse_config/; replay it with
#   cargo +nightly fuzz run parse_config fuzz/artifacts/parse_config/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-120}
target=parse_config
corpus=fuzz/corpus/$target

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# The corpus grows between runs (it is ignored by git); the seeds are kept
# in the repo.
mkdir -p "$corpus"
cp fuzz/seeds/$target/* "$corpus"/

log=$(mktemp)
trap 'rm -f "$log"' EXIT

status=0
cargo +nightly fuzz run "$target" "$corpus" -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tee "$log" || status=$?

# libFuzzer's last status line, e.g. "#123456 DONE cov: ... exec/s: 700 ..."
# or "Done 123456 runs in 180 second(s)".
runs=$(grep -oE '^Done [0-9]+ runs' "$log" | tail -n1 | grep -oE '[0-9]+' || true)
if [ -z "$runs" ]; then
  runs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#' || true)
fi
elapsed=$(grep -oE 'runs in [0-9]+ second' "$log" | tail -n1 | grep -oE '[0-9]+' || true)
if [ "$status" -eq 0 ]; then
  result="no crash"
else
  artifact=$(grep -oE 'fuzz/artifacts/[^ ]+' "$log" | tail -n1 || true)
  result="CRASH (exit $status${artifact:+, input: $artifact})"
fi
echo "fuzz summary: target=$target runs=${runs:-?} seconds=${elapsed:-$seconds} result=$result"
exit "$status"
