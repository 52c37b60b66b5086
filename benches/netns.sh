#!/usr/bin/env bash
# The project's head-to-head: sitelinkd, wireguard-go and boringtun, each at both ends of a
# tunnel between two network namespaces, configured with `wg`, measured in the same run.
# Prints one table: TCP Gbit/s (iperf3), 64-byte UDP datagrams/s delivered (iperf3 -l 64:
# the generator itself tops out near 90,000/s here, so this column bounds from below),
# idle ping RTT, and peak RSS of each end. Needs root and ../shared/bench (the common harness).
# usage: sudo benches/netns.sh [seconds]
set -u
cd "$(dirname "$0")/.."
T=${1:-8}
H=../shared/bench/peer-tunnel.sh
[ -f "$H" ] || { echo "missing $H"; exit 1; }
cargo build --release --quiet --bin sitelinkd || exit 1
export SITELINKD=$PWD/target/release/sitelinkd
printf '%-16s %10s %12s %12s %10s %10s\n' impl tcp_Gbps udp64_pps ping_us rssA_KiB rssB_KiB
for impl in sitelink wireguard-go boringtun; do
  tcp=$(NL_ID=$((RANDOM % 9000 + 1000)) bash $H $impl $impl $T tcp)
  udp=$(NL_ID=$((RANDOM % 9000 + 1000)) bash $H $impl $impl $T udp64)
  png=$(NL_ID=$((RANDOM % 9000 + 1000)) bash $H $impl $impl 1 ping)
  rss=$(echo "$tcp" | grep -oE 'rss[AB]_KiB=[0-9]*' | cut -d= -f2 | tr '\n' ' ')
  printf '%-16s %10s %12s %12s %10s %10s\n' $impl "$(echo $tcp | awk '{print $4}')" \
    "$(echo $udp | awk '{print $4}')" "$(echo $png | awk '{print $4}')" $rss
done
