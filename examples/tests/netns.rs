//! Integration as root: two network namespaces joined by a veth pair, sitelinkd in one and
//! sitelinkd, wireguard-go or boringtun in the other, configured with the stock `wg` tool.
//! Each test pings across the tunnel, moves a TCP stream whose content is checked end to end,
//! and reads the `wg show` counters.
//!
//! Without root or the peer programs these tests say so loudly and pass; with `CI=true` they
//! must run and fail instead. Namespaces, interfaces and processes are removed by a guard,
//! even when a test fails. Addresses exist only inside the namespaces made here.

mod common;

use std::time::Duration;

use common::{Impl, Pair, can_run, io_counter, needs};

/// sitelinkd (backend `backend`) on side A, `peer` on side B; `initiator` sends first.
fn link_test(backend: &'static str, peer: Impl, initiator: usize) {
    link_test_with(backend, peer, initiator, 1);
}

/// As [`link_test`], with `workers` sitelinkd workers on side A (and on side B if it is
/// sitelinkd too). Returns the pair, still running.
fn link_test_with(backend: &'static str, peer: Impl, initiator: usize, workers: usize) -> Option<Pair> {
    link_test_with_args(backend, peer, initiator, workers, &[])
}

/// [`link_test_with`], with `args` added to sitelinkd's command line.
fn link_test_with_args(
    backend: &'static str,
    peer: Impl,
    initiator: usize,
    workers: usize,
    args: &[&str],
) -> Option<Pair> {
    if !can_run(&needs(peer)) {
        return None;
    }
    let mut pair = Pair::new();
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["--workers".to_owned(), workers.to_string()]);
    pair.extra_args = [args.clone(), args];
    pair.start(0, Impl::Sitelink(backend));
    pair.start(1, peer);
    pair.configure();
    let other = 1 - initiator;
    pair.ns_exec(initiator, &format!("ping -c 3 -i 0.2 -W 3 10.202.0.{}", other + 1));
    pair.ns_exec(other, &format!("ping -c 2 -i 0.2 -W 3 10.202.0.{}", initiator + 1));
    pair.tcp_transfer_checked(initiator, 4 << 20);
    pair.tcp_transfer_checked(other, 1 << 20);
    for side in 0..2 {
        let (rx, tx) = pair.transfer(side);
        assert!(rx > 1 << 20 && tx > 1 << 20, "side {side} counters rx {rx} tx {tx}");
    }
    // Our side reports the handshake as wall-clock time, as `wg` expects (boringtun 0.7
    // reports the time since the handshake instead, so the peer's is not checked).
    assert!(pair.latest_handshake(0) > 1_600_000_000, "sitelinkd shows no handshake");
    // A receiver cannot count more than its peer sent (it may count less: a fast sender can
    // overrun a slower peer's socket buffer, and TCP then resends). boringtun counts its bytes
    // without WireGuard's header and tag, so only peers that count whole messages compare.
    if peer != Impl::Boringtun {
        let (a, b) = (pair.transfer(0), pair.transfer(1));
        assert!(b.0 <= a.1 + 4096 && a.0 <= b.1 + 4096, "A (rx, tx) {a:?} B {b:?}");
    }
    Some(pair)
}

/// The numbers in a `name=[a, b, ...]` field of sitelinkd's final counters line.
fn per_worker(line: &str, name: &str) -> Vec<u64> {
    let start =
        line.find(&format!("{name}=[")).unwrap_or_else(|| panic!("{name} not in {line}")) + name.len() + 2;
    let end = start + line[start..].find(']').expect("closing bracket");
    line[start..end].split(',').map(|n| n.trim().parse().expect("a count")).collect()
}

/// Two workers on each side (a multi-queue TUN device, two sockets on one port): the usual
/// checks pass, and many flows at once are spread over both of side A's TUN queues.
#[test]
fn sitelink_two_workers_with_sitelink_two_workers() {
    let Some(mut pair) = link_test_with("uring", Impl::Sitelink("mmsg"), 0, 2) else { return };
    // 64 UDP flows (one source port each) into the tunnel; the kernel picks each flow's queue.
    pair.ns_exec(
        0,
        "python3 -c 'import socket\n\
         socks=[socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]\n\
         [s.sendto(bytes(100), (\"10.202.0.2\", 9)) for _ in range(20) for s in socks]'",
    );
    let last = pair.stop_and_read_counters(0);
    let tun_rx = per_worker(&last, "tun_rx_per_worker");
    assert_eq!(tun_rx.len(), 2, "{last}");
    assert!(tun_rx.iter().all(|&n| n > 0), "a worker read nothing from its TUN queue: {last}");
}

#[test]
fn sitelink_two_workers_with_wireguard_go() {
    link_test_with("uring", Impl::WireguardGo, 1, 2);
}

#[test]
fn sitelink_two_workers_initiates_to_boringtun() {
    link_test_with("mmsg", Impl::Boringtun, 0, 2);
}

#[test]
fn sitelink_with_sitelink_mmsg() {
    link_test("mmsg", Impl::Sitelink("mmsg"), 0);
}

#[test]
fn sitelink_with_sitelink_uring() {
    link_test("uring", Impl::Sitelink("uring"), 1);
}

#[test]
fn sitelink_initiates_to_wireguard_go() {
    link_test("mmsg", Impl::WireguardGo, 0);
}

#[test]
fn wireguard_go_initiates_to_sitelink() {
    link_test("uring", Impl::WireguardGo, 1);
}

#[test]
fn sitelink_initiates_to_boringtun() {
    link_test("uring", Impl::Boringtun, 0);
}

#[test]
fn boringtun_initiates_to_sitelink() {
    link_test("mmsg", Impl::Boringtun, 1);
}

/// Garbage at the port is counted and dropped; the link keeps forwarding.
#[test]
fn sitelinkd_survives_garbage_and_counts_it() {
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    let mut pair = Pair::new();
    pair.extra_args[1] = vec!["--no-realtime".into()];
    pair.start(0, Impl::Sitelink("mmsg"));
    pair.start(1, Impl::Sitelink("mmsg"));
    pair.configure();
    pair.ns_exec(0, "ping -c 2 -i 0.2 -W 3 10.202.0.2");
    // The workers run under SCHED_FIFO by default (root has CAP_SYS_NICE) while the link is
    // loaded, in the fair class while it is idle, and always with --no-realtime.
    assert_eq!(worker_policies(pair.pid(0)), vec![SCHED_OTHER], "side 0's workers, idle");
    let (pid0, pid1) = (pair.pid(0), pair.pid(1));
    let done = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = (Vec::new(), Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for (pid, policies) in [(pid0, &mut seen.0), (pid1, &mut seen.1)] {
                    for p in worker_policies(pid) {
                        if !policies.contains(&p) {
                            policies.push(p);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            seen
        });
        pair.tcp_transfer_checked(1, 256 << 20);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert!(seen.0.contains(&SCHED_FIFO), "side 0's workers under load: {:?}", seen.0);
    assert_eq!(seen.1, vec![SCHED_OTHER], "side 1's workers (--no-realtime)");
    // Random bytes, truncated and oversized messages, a transport header naming no session.
    pair.ns_exec(
        1,
        "python3 -c 'import socket,os\n\
         s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         msgs=[os.urandom(n) for n in (1,3,4,31,32,64,148,92,1500)]*20\n\
         msgs+=[bytes([4,0,0,0])+os.urandom(60) for _ in range(50)]\n\
         msgs+=[bytes([1,0,0,0])+os.urandom(144) for _ in range(50)]\n\
         msgs+=[bytes([5,0,0,0])+os.urandom(40), b\"\"]\n\
         [s.sendto(m, (\"10.201.0.1\", 51820)) for m in msgs]'",
    );
    pair.ns_exec(0, "ping -c 3 -i 0.2 -W 3 10.202.0.2");
    pair.tcp_transfer_checked(1, 1 << 20);
    // sitelinkd logs its final counters when stopped: every kind of garbage was counted by
    // reason.
    let last = pair.stop_and_read_counters(0);
    for reason in ["malformed", "unknown_receiver_index", "bad_mac1"] {
        assert!(last.contains(reason), "{reason} not counted: {last}");
    }
    // And the kernel's drops at the TUN queue, read from the device in its namespace.
    assert!(last.contains("tun_queue_drops=Some("), "the TUN queue's drops not read: {last}");
}

/// Linux's scheduling policies, as `/proc` shows them.
const SCHED_OTHER: i32 = 0;
const SCHED_FIFO: i32 = 1;

/// The scheduling policies of a process's worker threads (`sitelink-worker-N`), from
/// `/proc/PID/task/*/stat` (field 41).
fn worker_policies(pid: u32) -> Vec<i32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads") {
        let Ok(stat) = std::fs::read_to_string(task.expect("a thread").path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.contains("(sitelink-worker") {
            continue;
        }
        // Field 3 is the first after the name: the policy, field 41, is the 39th of those.
        let policy = rest.split_whitespace().nth(38).expect("a policy field");
        policies.push(policy.parse().expect("a number"));
    }
    policies
}

/// wg-quick brings sitelinkd up as its userspace implementation (so sitelinkd daemonizes),
/// `wg showconf`, `wg syncconf` and `wg setconf` round-trip the configuration, and
/// `wg-quick down` stops the daemon and removes its socket.
#[test]
fn wg_quick_drives_sitelinkd_and_the_conf_commands_round_trip() {
    let mut needed = needs(Impl::Sitelink("uring"));
    needed.push("wg-quick");
    if !can_run(&needed) {
        return;
    }
    let mut pair = Pair::new();
    for side in 0..2 {
        pair.keys[side] = common::must("wg genkey").trim().to_owned();
        pair.pubs[side] = common::must(&format!("echo {} | wg pubkey", pair.keys[side])).trim().to_owned();
    }
    let dir = std::env::temp_dir().join(format!("sitelink-wgq-{}", pair.ifname[0]));
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = |side: usize| dir.join(format!("{}.conf", pair.ifname[side]));
    for side in 0..2 {
        let other = 1 - side;
        std::fs::write(
            conf(side),
            format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.202.0.{}/24\n\n\
                 [Peer]\nPublicKey = {}\nAllowedIPs = 10.202.0.{}/32\nEndpoint = 10.201.0.{}:51820\n",
                pair.keys[side],
                side + 1,
                pair.pubs[other],
                other + 1,
                other + 1
            ),
        )
        .expect("conf");
        pair.ns_exec(
            side,
            &format!(
                "env WG_QUICK_USERSPACE_IMPLEMENTATION={} wg-quick up {} </dev/null >/dev/null 2>&1",
                common::SITELINKD,
                conf(side).display()
            ),
        );
    }
    assert!(pair.ping_until(0, std::time::Duration::from_secs(10)).is_some(), "no link after wg-quick up");
    let shown = dir.join("shown.conf");
    pair.ns_exec(0, &format!("sh -c 'wg showconf {} > {}'", pair.ifname[0], shown.display()));
    let text = std::fs::read_to_string(&shown).expect("showconf");
    assert!(
        text.contains(&pair.pubs[1]) && text.contains("10.202.0.2/32") && text.contains("ListenPort = 51820")
    );
    pair.ns_exec(0, &format!("wg syncconf {} {}", pair.ifname[0], shown.display()));
    pair.ns_exec(0, &format!("wg setconf {} {}", pair.ifname[0], shown.display()));
    assert!(pair.ping_until(0, std::time::Duration::from_secs(10)).is_some(), "no link after setconf");
    pair.tcp_transfer_checked(0, 1 << 20);
    pair.ns_exec(0, &format!("wg-quick down {} </dev/null >/dev/null 2>&1", conf(0).display()));
    let start = std::time::Instant::now();
    while std::path::Path::new(&pair.socket(0)).exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "sitelinkd kept its socket after wg-quick down"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    pair.ns_exec(1, &format!("wg-quick down {} </dev/null >/dev/null 2>&1", conf(1).display()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `wg addconf` of 10,000 peers with endpoints (about 1 MiB of UAPI text) is applied, and
/// `wg show` lists them; sitelinkd used to close the socket mid-request (wg died of SIGPIPE).
/// A `wg` configuration of `n` made-up peers (wg checks only the keys' encoding), with
/// endpoints inside the test's own namespaces: nothing is sent to them, as nothing is routed
/// to their allowed IPs and none has a persistent keepalive.
fn many_peers_conf(n: u32) -> String {
    let mut conf = String::with_capacity(n as usize * 160);
    for i in 0..n {
        let mut key = [0x42u8; 32];
        key[..4].copy_from_slice(&i.to_le_bytes());
        let key = sitelink::PublicKey::from_bytes(key).to_base64();
        conf += &format!(
            "[Peer]\nPublicKey = {key}\nAllowedIPs = 10.{}.{}.{}/32\nEndpoint = 10.201.0.2:{}\n\n",
            100 + (i >> 16),
            (i >> 8) & 255,
            i & 255,
            1024 + (i % 60_000)
        );
    }
    conf
}

/// A hub: 10,000 peers added by `wg addconf` before the one that carries traffic, then the
/// whole configuration read back by `wg showconf` and applied again by `wg setconf`. The busy
/// peer, configured last, gets the connected socket (one per worker), not the first 32
/// configured; the link works throughout.
#[test]
fn wg_addconf_and_setconf_of_ten_thousand_peers_keep_the_busy_link() {
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    let mut pair = Pair::new();
    pair.start(0, Impl::Sitelink("mmsg"));
    pair.start(1, Impl::Sitelink("uring"));
    let path = std::env::temp_dir().join(format!("sitelink-addconf-{}.conf", pair.ifname[0]));
    std::fs::write(&path, many_peers_conf(10_000)).expect("conf");
    let (ok, out) =
        common::sh(&format!("ip netns exec {} wg addconf {} {}", pair.ns[0], pair.ifname[0], path.display()));
    assert!(ok, "wg addconf failed: {out}");
    pair.configure();
    let peers = pair.ns_exec(0, &format!("wg show {} peers", pair.ifname[0]));
    assert_eq!(peers.lines().count(), 10_001);
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "no link beside 10,000 peers");
    pair.tcp_transfer_checked(0, 4 << 20);

    // Round trip: showconf, then setconf (which replaces every peer, and so the session).
    let started = std::time::Instant::now();
    let conf = pair.ns_exec(0, &format!("wg showconf {}", pair.ifname[0]));
    eprintln!("wg showconf of 10,001 peers: {:?}, {} bytes", started.elapsed(), conf.len());
    assert_eq!(conf.matches("[Peer]").count(), 10_001);
    std::fs::write(&path, conf).expect("conf");
    let (ok, out) =
        common::sh(&format!("ip netns exec {} wg setconf {} {}", pair.ns[0], pair.ifname[0], path.display()));
    let _ = std::fs::remove_file(&path);
    assert!(ok, "wg setconf failed: {out}");
    let peers = pair.ns_exec(0, &format!("wg show {} peers", pair.ifname[0]));
    assert_eq!(peers.lines().count(), 10_001);
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "no link after setconf");
    pair.tcp_transfer_checked(0, 4 << 20);

    let counters = pair.stop_and_read_counters(0);
    let connected = per_worker_total(&counters, "peer_sockets");
    // Two workers by default on this machine: each connects the busy peer, and nobody else.
    assert!(
        (1..=2).contains(&connected),
        "connected sockets: {connected}, wanted the busy peer's: {counters}"
    );
}

/// The value of `name: N` in a counters line (0 if absent).
fn per_worker_total(line: &str, name: &str) -> u64 {
    let key = format!("{name}: ");
    line.find(&key)
        .and_then(|at| line[at + key.len()..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// Refusals at the UAPI: a `wg` request over the size limit and a malformed one written by
/// hand each get an errno reply (so `wg` says why) and a line in sitelinkd's log, and change
/// nothing.
#[test]
fn uapi_refusals_get_an_errno_and_a_log_line() {
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    let mut pair = Pair::new();
    pair.start(0, Impl::Sitelink("mmsg"));
    // One peer with about 17 MiB of allowed IPs (24 bytes each on the UAPI): past the limit.
    let path = std::env::temp_dir().join(format!("sitelink-oversized-{}.conf", pair.ifname[0]));
    let key = sitelink::PublicKey::from_bytes([0x24; 32]).to_base64();
    let mut conf = format!("[Peer]\nPublicKey = {key}\n");
    let per_line = 1000;
    let lines = sitelink::uapi::MAX_REQUEST_BYTES / 24 / per_line + 10;
    for l in 0..lines {
        let ips: Vec<String> =
            (0..per_line).map(|i| format!("10.{}.{}.{}/32", 100 + l / 256, l % 256, i % 256)).collect();
        conf += &format!("AllowedIPs = {}\n", ips.join(", "));
    }
    std::fs::write(&path, conf).expect("conf");
    let (ok, out) =
        common::sh(&format!("ip netns exec {} wg addconf {} {}", pair.ns[0], pair.ifname[0], path.display()));
    let _ = std::fs::remove_file(&path);
    assert!(!ok, "an oversized request was accepted");
    assert!(out.contains("Message too long"), "wg did not get EMSGSIZE: {out}");
    let peers = pair.ns_exec(0, &format!("wg show {} peers", pair.ifname[0]));
    assert!(peers.trim().is_empty(), "a refused request changed the device: {peers}");

    // Malformed: `wg` checks its input, so this one is written to the socket by hand.
    use std::io::{Read, Write};
    let mut sock = std::os::unix::net::UnixStream::connect(pair.socket(0)).expect("UAPI socket");
    sock.write_all(b"set=1\nlisten_port=not-a-port\n\n").expect("write");
    let mut reply = String::new();
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = sock.read_to_string(&mut reply);
    assert!(reply.starts_with("errno=-22\n"), "malformed request answered {reply:?}");

    pair.stop(0);
    let log = std::fs::read_to_string(pair.log_path(0)).expect("log");
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("UAPI set refused")).collect();
    assert_eq!(refusals.len(), 2, "wanted a log line per refusal: {log}");
    assert!(refusals[0].contains("longer than"), "{}", refusals[0]);
    assert!(refusals[1].contains("listen_port"), "{}", refusals[1]);
}

/// sitelinkd with a peer that has segmentation offloads of its own: the usual checks, and on
/// our side super-packets crossed the TUN device both ways (read and split, coalesced and
/// written), so the offload paths met a peer we did not write.
///
/// gotatun sends its datagrams one at a time. Real-time workers (sitelinkd's default) take
/// each as it comes, in turns of one, with nothing beside it to coalesce; so against gotatun
/// the workers run in the fair class, where datagrams wait for the turn together, and the
/// coalescing meets gotatun's packets. (Against a sender that fills the link, turns grow by
/// themselves: `scheduling.rs`.)
fn offload_interop(backend: &'static str, peer: Impl, initiator: usize) {
    let args: &[&str] = if peer == Impl::Gotatun { &["--realtime=false"] } else { &[] };
    let Some(mut pair) = link_test_with_args(backend, peer, initiator, 1, args) else { return };
    let last = pair.stop_and_read_counters(0);
    assert!(io_counter(&last, "tun_gso_reads") > 0, "no super-packet read: {last}");
    assert!(io_counter(&last, "tun_gso_writes") > 0, "no coalesced write: {last}");
    assert_eq!(io_counter(&last, "tun_offload_errors"), 0, "{last}");
    if matches!(peer, Impl::WireguardGo2023) {
        // It sends runs with GSO: they came in through GRO, landing one datagram to a buffer
        // (a run of a size not seen just before is copied apart: a few).
        let (runs, copied, rx) = (
            io_counter(&last, "udp_gro_reads"),
            io_counter(&last, "udp_gro_copied"),
            io_counter(&last, "udp_rx"),
        );
        assert!(runs > 0, "no GRO run came in: {last}");
        assert!(copied * 4 <= rx, "{copied} of {rx} datagrams copied out of runs: {last}");
    }
}

#[test]
fn sitelink_initiates_to_wireguard_go_2023() {
    offload_interop("uring", Impl::WireguardGo2023, 0);
}

#[test]
fn wireguard_go_2023_initiates_to_sitelink() {
    offload_interop("mmsg", Impl::WireguardGo2023, 1);
}

#[test]
fn sitelink_initiates_to_gotatun() {
    offload_interop("mmsg", Impl::Gotatun, 0);
}

#[test]
fn gotatun_initiates_to_sitelink() {
    offload_interop("uring", Impl::Gotatun, 1);
}
