#!/usr/bin/env bash
# A hub's cost: the same implementation at both ends of a tunnel between two network
# namespaces (the common harness's nl_link), with N - 1 idle peers added beside the busy one on
# each side by one `wg addconf` (made-up keys, each with a /32 and an endpoint inside the test
# namespace; nothing is routed to them, so nothing is sent to those endpoints). For N = 1,
# 1,000 and 10,000 it prints:
#   addconf_ms  how long the `wg addconf` of N - 1 peers took on side A
#   tcp_Gbps    iperf3 TCP through the busy peer for SECONDS
#   ping_us     idle ping RTT (mean of 50 pings at 20 ms)
#   idle_ticks  CPU ticks (10 ms) daemon A used over 10 idle seconds (1% of a core = 10)
#   rssA_KiB    peak RSS of daemon A
# Implementations not installed are skipped. Needs root, ../shared/bench, iperf3,
# wireguard-tools; ../shared/bench/install-peers.sh installs the peers.
# usage: sudo benches/many-peers.sh [seconds] [rounds] [impl...]
#   (default impls: sitelink wireguard-go wireguard-go-2023)
set -u
cd "$(dirname "$0")/.."
T=${1:-6}
ROUNDS=${2:-1}
shift 2 2>/dev/null || shift $#
IMPLS=${*:-sitelink wireguard-go wireguard-go-2023}
. ../shared/bench/netns-lib.sh || exit 1
cargo build --release --quiet --bin sitelinkd || exit 1
export SITELINKD=$PWD/target/release/sitelinkd
CONF_DIR=$(mktemp -d /tmp/many-peers.XXXXXX)
trap 'rm -rf "$CONF_DIR"' EXIT

for n in 1000 10000; do
  python3 - "$((n - 1))" "$CONF_DIR/peers-$n.conf" <<'PY'
import base64, struct, sys
count, path = int(sys.argv[1]), sys.argv[2]
with open(path, 'w') as f:
    for i in range(count):
        key = base64.b64encode(struct.pack('<I', i) + b'\x42' * 28).decode()
        f.write(f"[Peer]\nPublicKey = {key}\nAllowedIPs = 10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32\n"
                f"Endpoint = 10.77.0.9:{1024 + i % 60000}\n\n")
PY
done

installed() {
  case $1 in
    sitelink) [ -x "$SITELINKD" ] ;;
    wireguard-go-2023) command -v "${WIREGUARD_GO_2023:-wireguard-go-2023}" >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}
cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }

measure() { # impl peers
  (
    NL_ID=$((RANDOM % 9000 + 1000)); NA=nlA$NL_ID; NB=nlB$NL_ID; IA=wa$NL_ID; IB=wb$NL_ID; NL_PIDS=()
    trap nl_cleanup EXIT
    export SITELINK_BACKEND=uring
    nl_link $1 $1 >/dev/null 2>&1 || { printf '%-18s %6s setup FAILED\n' "$1" "$2"; exit 0; }
    ms=0
    if [ "$2" -gt 1 ]; then
      t0=$(date +%s%N)
      ip netns exec $NA wg addconf $IA $CONF_DIR/peers-$2.conf || { printf '%-18s %6s addconf FAILED\n' "$1" "$2"; exit 0; }
      ms=$(( ($(date +%s%N) - t0) / 1000000 ))
      ip netns exec $NB wg addconf $IB $CONF_DIR/peers-$2.conf || { printf '%-18s %6s addconf FAILED\n' "$1" "$2"; exit 0; }
    fi
    ip netns exec $NA ping -c 3 -i 0.2 -W 2 -q 10.88.0.2 >/dev/null 2>&1
    tcp=$(nl_tcp_gbps $T)
    sleep 1
    png=$(ip netns exec $NA ping -c 50 -i 0.02 -q 10.88.0.2 | awk -F/ '/rtt/{printf "%.0f", $5*1000}')
    c0=$(cpu_ticks $PIDA); sleep 10; c1=$(cpu_ticks $PIDA)
    printf '%-18s %6s %11s %9s %9s %11s %10s\n' "$1" "$2" "$ms" "$tcp" "${png:-FAILED}" "$((c1 - c0))" \
      "$(nl_rss $PIDA)"
  )
}

printf '%-18s %6s %11s %9s %9s %11s %10s\n' impl peers addconf_ms tcp_Gbps ping_us idle_ticks rssA_KiB
for round in $(seq "$ROUNDS"); do
  for impl in $IMPLS; do
    installed "$impl" || { printf '%-18s not installed, skipped\n' "$impl"; continue; }
    for n in 1 1000 10000; do
      measure "$impl" "$n"
    done
  done
done
