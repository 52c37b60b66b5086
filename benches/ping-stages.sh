#!/usr/bin/env bash
# Where a ping waits under load, stage by stage: a sitelinkd pair in two namespaces
# (../shared/bench/peer-tunnel.sh), TCP filling the tunnel from A to B, and a ping from A
# every 20 ms. Packet sockets timestamp each ping at A's TUN device, at A's veth (sealed, as
# it leaves and as its reply comes back) and at B's TUN device, so that each crossing of a
# daemon is timed on its own:
#   A req: A's TUN to A's veth (the data sender seals the request)
#   B req: the veth to B's TUN (the data receiver opens it)
#   B echo: B's kernel answers
#   B rep: B's TUN to the veth (the receiver seals the reply)
#   A rep: the veth to A's TUN (the sender opens it)
# usage: sudo benches/ping-stages.sh [seconds] [pings]   (SITELINKD= another build; root)
# The capture costs CPU too: compare builds in alternating runs, not with peer-tunnel.sh's
# pingload figures.
set -eu
cd "$(dirname "$0")/.."
T=${1:-18}; N=${2:-600}
export NL_ID=${NL_ID:-$$} SITELINKD=${SITELINKD:-target/release/sitelinkd}
DIR=$(mktemp -d /tmp/ping-stages.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cat > "$DIR/cap.py" <<'PY'
# cap.py IFNAME icmp|sealed SECONDS OUT: kernel timestamps of matching packets
import ctypes, socket, struct, sys, time
ifname, kind, secs, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
# Classic BPF on the IP header: ICMP; or UDP of IP length 156 (an 84-byte ping sealed:
# 16 header + 96 padded + 16 tag + 8 UDP + 20 IP), which no TCP segment or ACK has.
if kind == "icmp":
    prog = [(0x30, 0, 0, 9), (0x15, 0, 1, 1), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
else:
    prog = [(0x30, 0, 0, 9), (0x15, 0, 3, 17), (0x28, 0, 0, 2), (0x15, 0, 1, 156),
            (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
s.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", len(prog), ctypes.addressof(code)))  # SO_ATTACH_FILTER
s.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
s.bind((ifname, 0))
s.settimeout(0.5)
rows, end = [], time.time() + secs
while time.time() < end:
    try:
        data, anc, _, addr = s.recvmsg(256, 64)
    except socket.timeout:
        continue
    stamp = next((struct.unpack("qq", d[:16]) for _, t, d in anc if t == 35), None)
    if stamp is None:
        continue
    ts = "%d.%09d" % stamp
    if kind == "icmp":
        if len(data) >= 28:
            rows.append("%s %d %d %d" % (ts, addr[2], data[20], struct.unpack(">H", data[26:28])[0]))
    else:
        rows.append("%s %d" % (ts, addr[2]))
open(out, "w").write("".join(r + "\n" for r in rows))
PY
(
  sleep 3
  ip netns exec nlA$NL_ID python3 "$DIR/cap.py" wa$NL_ID icmp $((T - 4)) "$DIR/wa" &
  ip netns exec nlA$NL_ID python3 "$DIR/cap.py" va$NL_ID sealed $((T - 4)) "$DIR/va" &
  ip netns exec nlB$NL_ID python3 "$DIR/cap.py" wb$NL_ID icmp $((T - 4)) "$DIR/wb" &
  sleep 0.5
  ip netns exec nlA$NL_ID ping -q -c "$N" -i 0.02 10.88.0.2 >/dev/null 2>&1 || true
  wait
) &
bash ../shared/bench/peer-tunnel.sh sitelink sitelink "$T" tcp
wait
python3 - "$DIR" <<'PY'
import bisect, sys
d = sys.argv[1]
def rows(name):
    return [l.split() for l in open(f"{d}/{name}") if l.strip()]
def by_seq(rs, icmp_type):
    return {int(r[3]): float(r[0]) for r in rs if r[2] == icmp_type}
wa, wb, va = rows("wa"), rows("wb"), rows("va")
req_a, rep_a = by_seq(wa, "8"), by_seq(wa, "0")
req_b, rep_b = by_seq(wb, "8"), by_seq(wb, "0")
OUTGOING = "4"
sent = sorted(float(r[0]) for r in va if r[1] == OUTGOING)
came = sorted(float(r[0]) for r in va if r[1] != OUTGOING)
def first_between(ts, lo, hi):
    k = bisect.bisect_left(ts, lo)
    return ts[k] if k < len(ts) and ts[k] <= hi else None
stages = []
for seq, t1 in sorted(req_a.items()):
    if seq not in rep_a or seq not in req_b or seq not in rep_b:
        continue
    t4, t5, t7 = req_b[seq], rep_b[seq], rep_a[seq]
    t2, t6 = first_between(sent, t1, t4), first_between(came, t5, t7)
    if t2 is not None and t6 is not None:
        stages.append((t7 - t1, t2 - t1, t4 - t2, t5 - t4, t6 - t5, t7 - t6))
if not stages:
    sys.exit("no ping was seen at every point")
n = len(stages)
print("pings seen at every point: %d" % n)
for j, name in enumerate(["total", "A req", "B req", "B echo", "B rep", "A rep"]):
    v = sorted(s[j] * 1e6 for s in stages)
    print("%-7s p50 %6.0f  p90 %6.0f  p99 %6.0f  max %6.0f us" % (name, v[n // 2], v[int(n * .9)], v[int(n * .99)], v[-1]))
print("slowest pings, us (total: A req, B req, B echo, B rep, A rep):")
for s in sorted(stages, key=lambda s: -s[0])[:8]:
    print("  %6.0f: " % (s[0] * 1e6) + " ".join("%6.0f" % (x * 1e6) for x in s[1:]))
PY
