#!/usr/bin/env bash
# Idle ping RTT, every implementation under the same conditions: one tunnel per
# implementation, all up at once (each between its own two network namespaces, configured
# with `wg` through the common harness's helpers), pinged concurrently at 10 ms intervals with
# their pings spread evenly over the interval so that no two are in flight together. Rounds
# rotate which tunnel goes first. Prints per implementation the median, 10th and 90th
# percentile and mean RTT in microseconds over every ping.
#
# Sequential measurement (benches/netns.sh's ping column) compares runs seconds apart on a
# shared machine whose load drifts by more than the differences between implementations;
# this does not.
# Needs root, ../shared/bench, wireguard-go, wireguard-tools, boringtun-cli.
# usage: sudo benches/ping-pair.sh [pings per round] [rounds]   (SITELINKD=path tests another build)
set -u
cd "$(dirname "$0")/.."
N=${1:-500}
ROUNDS=${2:-3}
. ../shared/bench/netns-lib.sh || exit 1
cargo build --release --quiet --bin sitelinkd || exit 1
export SITELINKD=${SITELINKD:-$PWD/target/release/sitelinkd}
OUT=$(mktemp -d)
ALL_NS=()
cleanup() {
  for p in "${NL_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3
  for p in "${NL_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for n in "${ALL_NS[@]}"; do ip netns del "$n" 2>/dev/null; done
  rm -rf "$OUT"
}
trap cleanup EXIT

# label impl backend realtime (sitelink-uring-fair: sitelinkd's workers in the fair class)
TUNNELS=("sitelink-uring sitelink uring true" "sitelink-uring-fair sitelink uring false"
  "sitelink-mmsg sitelink mmsg true" "boringtun boringtun - -" "wireguard-go wireguard-go - -")
BASE=$((RANDOM % 5000 + 1000))
declare -a LABELS NSA
for t in "${!TUNNELS[@]}"; do
  read -r label impl backend realtime <<<"${TUNNELS[$t]}"
  NL_ID=$((BASE + t)); NA=nlA$NL_ID; NB=nlB$NL_ID; IA=wa$NL_ID; IB=wb$NL_ID
  ALL_NS+=("$NA" "$NB")
  SITELINK_BACKEND=$backend SITELINK_REALTIME=$realtime nl_link "$impl" "$impl" >/dev/null 2>&1 || { echo "$label: setup FAILED"; exit 1; }
  ip netns exec "$NA" ping -c 3 -i 0.2 -W 2 -q 10.88.0.2 >/dev/null 2>&1
  LABELS[$t]=$label; NSA[$t]=$NA # (nl_link's own loops use $i)
done

K=${#TUNNELS[@]}
for r in $(seq 0 $((ROUNDS - 1))); do
  pids=()
  for j in $(seq 0 $((K - 1))); do
    i=$(((j + r) % K))
    ip netns exec "${NSA[$i]}" ping -c "$N" -i 0.01 10.88.0.2 >>"$OUT/${LABELS[$i]}" 2>&1 &
    pids+=($!)
    sleep "$(awk -v k="$K" 'BEGIN{printf "%.4f", 0.01 / k}')"
  done
  wait "${pids[@]}"
done

printf '%-20s %8s %8s %8s %8s %8s\n' impl pings median p10 p90 mean
for i in $(seq 0 $((K - 1))); do
  python3 - "${LABELS[$i]}" "$OUT/${LABELS[$i]}" <<'PY'
import re, statistics, sys
v = sorted(float(m) * 1000 for m in re.findall(r'time=([\d.]+)', open(sys.argv[2]).read()))
if not v:
    print("%-20s FAILED" % sys.argv[1]); sys.exit()
print("%-20s %8d %8.0f %8.0f %8.0f %8.0f" % (sys.argv[1], len(v), statistics.median(v),
      v[len(v) // 10], v[len(v) * 9 // 10], statistics.mean(v)))
PY
done
