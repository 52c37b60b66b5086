#!/usr/bin/env bash
# The project's head-to-head: sitelinkd (each backend), wireguard-go (2022 and the offloading
# 0.0.20231211), gotatun and boringtun, each at both ends of a tunnel between two network
# namespaces, configured with `wg` through the common harness's helpers, measured in the same
# run. Prints one table, writes it to target/tmp/netns-results.txt and draws it as
# benches/head-to-head.svg (benches/chart.py):
#   tcp_Gbps     iperf3 TCP through the tunnel for SECONDS, one stream
#   tcp4_Gbps    the same with four parallel streams (iperf3 -P 4), which a multi-queue TUN
#                device can spread over sitelinkd's workers
#   udp64_pps    64-byte UDP datagrams per second delivered through the tunnel, sent as fast as
#                one sender thread can by our own generator (udprate: iperf3 tops out near
#                90,000/s here, far below what the tunnels carry)
#   ping_us      idle ping RTT (50 pings at 20 ms)
#   load_med_us, load_p99_us, load_tcp_Gbps
#                ping RTT median and p99 while one TCP stream fills the link (pings at 20 ms
#                from the second second on), and that stream's Gbit/s
#   rss          peak RSS of each end
# sitelinkd's workers run under SCHED_FIFO while they have time to spare (its default);
# sitelink-uring-fair is sitelinkd with --realtime=false, in the fair class.
# Needs root, ../shared/bench (install-peers.sh installs every peer), iperf3, wireguard-tools.
# usage: sudo benches/netns.sh [seconds] [impl...]
set -u
cd "$(dirname "$0")/.."
T=${1:-8}
shift || true
ONLY=" $* "
. ../shared/bench/netns-lib.sh || exit 1
cargo build --release --quiet --bin sitelinkd --bin udprate || exit 1
export SITELINKD=$PWD/target/release/sitelinkd
UDPRATE=$PWD/target/release/udprate

tcp4_gbps() { # seconds: four parallel streams from A to B
  ip netns exec $NB iperf3 -s -1 -D >/dev/null 2>&1; sleep 0.3
  ip netns exec $NA iperf3 -c 10.88.0.2 -P 4 -t $1 -J 2>/dev/null | python3 -c 'import json,sys
try: print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))
except Exception: print("FAILED")'
}

measure() { # label impl [backend] [workers] [realtime: true (default) | false]
  (
    NL_ID=$((RANDOM % 9000 + 1000)); NA=nlA$NL_ID; NB=nlB$NL_ID; IA=wa$NL_ID; IB=wb$NL_ID; NL_PIDS=()
    trap nl_cleanup EXIT
    export SITELINK_BACKEND=${3:-uring} SITELINK_WORKERS=${4:-1} SITELINK_REALTIME=${5:-true}
    nl_link $2 $2 >/dev/null 2>&1 || { printf '%-18s setup FAILED\n' "$1"; exit 0; }
    ip netns exec $NA ping -c 3 -i 0.2 -W 2 -q 10.88.0.2 >/dev/null 2>&1
    tcp=$(nl_tcp_gbps $T)
    tcp4=$(tcp4_gbps $T)
    ip netns exec $NB $UDPRATE recv 10.88.0.2:7000 $((T + 2)) >/tmp/udprate.$NL_ID 2>&1 &
    rpid=$!
    sleep 0.5
    ip netns exec $NA $UDPRATE send 10.88.0.2:7000 $T 64 1 >/dev/null 2>&1
    wait $rpid
    udp=$(grep -oE 'received_pps=[0-9]+' /tmp/udprate.$NL_ID | cut -d= -f2); rm -f /tmp/udprate.$NL_ID
    png=$(ip netns exec $NA ping -c 50 -i 0.02 -q 10.88.0.2 | awk -F/ '/rtt/{printf "%.0f", $5*1000}')
    (sleep 1; ip netns exec $NA ping -c $((T * 50 - 75)) -i 0.02 10.88.0.2 >/tmp/pingload.$NL_ID 2>&1) &
    ppid=$!
    ltcp=$(nl_tcp_gbps $T)
    wait $ppid
    load=$(python3 - /tmp/pingload.$NL_ID <<'PY'
import re, sys
r = sorted(float(m) * 1000 for m in re.findall(r"time=([0-9.]+) ms", open(sys.argv[1]).read()))
print("%.0f %.0f" % (r[len(r) // 2], r[min(len(r) - 1, int(len(r) * 0.99))]) if r else "FAILED FAILED")
PY
); rm -f /tmp/pingload.$NL_ID
    printf '%-18s %9s %9s %10s %8s %11s %11s %13s %9s %9s\n' "$1" "$tcp" "$tcp4" "${udp:-FAILED}" \
      "${png:-FAILED}" $load "$ltcp" "$(nl_rss $PIDA)" "$(nl_rss $PIDB)"
  )
}

want() { [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $1 "* ]]; }
mkdir -p target/tmp
{
printf '%-18s %9s %9s %10s %8s %11s %11s %13s %9s %9s\n' impl tcp_Gbps tcp4_Gbps udp64_pps ping_us \
  load_med_us load_p99_us load_tcp_Gbps rssA_KiB rssB_KiB
want sitelink-uring && measure sitelink-uring sitelink uring
want sitelink-uring-w2 && measure sitelink-uring-w2 sitelink uring 2
want sitelink-uring-fair && measure sitelink-uring-fair sitelink uring 1 false
want sitelink-mmsg && measure sitelink-mmsg sitelink mmsg
want wireguard-go-2023 && measure wireguard-go-2023 wireguard-go-2023
want gotatun && measure gotatun gotatun
want wireguard-go && measure wireguard-go wireguard-go
want boringtun && measure boringtun boringtun
} | tee target/tmp/netns-results.txt
python3 benches/chart.py target/tmp/netns-results.txt benches/head-to-head.svg \
  "sitelinkd and the userspace WireGuards, $T s per test, $(nproc) vCPU, $(uname -r)"
echo "chart: benches/head-to-head.svg"
