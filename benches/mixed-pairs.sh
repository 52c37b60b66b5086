#!/usr/bin/env bash
# Mixed pairs: sitelinkd facing each other WireGuard, TCP both ways, beside each peer paired
# with itself, in one run (../shared/bench/peer-tunnel.sh, MTU 1420). A mixed pair should move
# at least what the slower of its two members moves paired with itself.
# Needs root and the peers (../shared/bench/install-peers.sh).
# usage: sudo benches/mixed-pairs.sh [seconds] [rounds]
set -u
cd "$(dirname "$0")/.."
T=${1:-5}; R=${2:-2}
cargo build --release --quiet --bin sitelinkd || exit 1
export SITELINKD=$PWD/target/release/sitelinkd
H=../shared/bench/peer-tunnel.sh
gbps() { bash $H "$1" "$2" $T tcp | awk '{print $4}'; }
printf '%-18s %12s %12s %12s %12s\n' peer self_Gbps sitelink_self peer_to_sl sl_to_peer
for p in wireguard-go-2023 gotatun wireguard-go boringtun; do
  for r in $(seq $R); do
    printf '%-18s %12s %12s %12s %12s\n' "$p" "$(gbps $p $p)" "$(gbps sitelink sitelink)" \
      "$(gbps $p sitelink)" "$(gbps sitelink $p)"
  done
done
