#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) from its seed corpus, on the stable
# toolchain (RUSTC_BOOTSTRAP=1 unlocks the nightly flags cargo-fuzz needs). A crash fails the
# run and leaves its input in fuzz/artifacts/TARGET/ (turn it into a regression test).
# Prints executions per target.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-30}
export RUSTC_BOOTSTRAP=1
cargo run --quiet --release --example make-seeds
targets=$(cargo fuzz list)
cargo fuzz build --sanitizer none $targets >/dev/null 2>&1 || cargo fuzz build --sanitizer none
fail=0
for t in $targets; do
  mkdir -p corpus/$t
  log=$(mktemp)
  if cargo fuzz run --sanitizer none $t corpus/$t -- -max_total_time=$SECS -rss_limit_mb=2048 >"$log" 2>&1; then
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    [ -n "$execs" ] || execs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
    echo "fuzz $t: ok, ${execs:-?} executions in ${SECS}s"
  else
    echo "fuzz $t: FAILED"; tail -40 "$log"; fail=1
  fi
  rm -f "$log"
done
exit $fail
