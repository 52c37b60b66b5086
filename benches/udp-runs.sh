#!/usr/bin/env bash
# UDP through a sitelinkd pair, large datagrams as fast as one iperf3 sender can: with the
# TUN device's UDP segmentation offload (USO: the receiving daemon writes a run of one UDP
# flow's datagrams as one super-packet), and with USO refused (SITELINK_TEST_REFUSE=uso:
# one write per datagram), alternating, in one run. Prints what iperf3's receiver got.
# Needs root, iperf3, wireguard-tools (../shared/bench/netns-lib.sh).
# usage: sudo benches/udp-runs.sh [seconds] [rounds]
set -u
cd "$(dirname "$0")/.."
T=${1:-5}; R=${2:-3}
. ../shared/bench/netns-lib.sh || exit 1
cargo build --release --quiet --bin sitelinkd || exit 1
export SITELINKD=$PWD/target/release/sitelinkd

udp_mbps() { # refusals: iperf3 UDP, 1,372-byte datagrams (a full 1,420-byte packet), A to B
  (
    NL_ID=$((RANDOM % 9000 + 1000)); NA=nlA$NL_ID; NB=nlB$NL_ID; IA=wa$NL_ID; IB=wb$NL_ID; NL_PIDS=()
    trap nl_cleanup EXIT
    SITELINK_TEST_REFUSE=$1 nl_link sitelink sitelink >/dev/null || { echo FAILED; exit; }
    ip netns exec $NA ping -c 3 -i 0.2 -W 2 -q 10.88.0.2 >/dev/null 2>&1
    ip netns exec $NB iperf3 -s -1 -D >/dev/null 2>&1; sleep 0.3
    ip netns exec $NA iperf3 -c 10.88.0.2 -u -b 0 -l 1372 -t $T -J 2>/dev/null | python3 -c 'import json,sys
try:
    e = json.load(sys.stdin)["end"]["sum"]
    print("%.0f Mbit/s, %.1f%% lost" % (e["bits_per_second"] * (1 - e["lost_percent"] / 100) / 1e6, e["lost_percent"]))
except Exception: print("FAILED")'
  )
}

printf '%-6s %-24s %-24s\n' round "USO (runs coalesced)" "USO refused"
for r in $(seq $R); do
  printf '%-6s %-24s %-24s\n' $r "$(udp_mbps '')" "$(udp_mbps uso)"
done
