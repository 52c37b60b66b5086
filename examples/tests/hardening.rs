//! Hardening as root, between two network namespaces: a hostile network (our middlebox),
//! handshake floods, a peer restarting, roaming mid-transfer, rekeys under traffic with
//! shortened timers, the TUN device vanishing, and keys kept out of logs.
//!
//! Like the interop tests, these say loudly when they cannot run, and under CI=true fail
//! instead of skipping.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Impl, Pair, can_run, must, needs};

const MIDDLEBOX: &str = env!("CARGO_BIN_EXE_middlebox");
const FLOOD: &str = env!("CARGO_BIN_EXE_flood");

/// These tests run one at a time: one measures throughput, and all of them load the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sitelink_pair(backends: [&'static str; 2], env: &[(&str, &str)]) -> Option<Pair> {
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return None;
    }
    let mut pair = Pair::new();
    pair.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    pair.start(0, Impl::Sitelink(backends[0]));
    pair.start(1, Impl::Sitelink(backends[1]));
    Some(pair)
}

/// The drop reasons named in a final-counters log line.
fn counted(line: &str, reason: &str) -> u64 {
    let key = format!("\"{reason}\": ");
    line.split(&key)
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hostile_network_delivers_intact_and_counts_every_drop() {
    let _serial = serial();
    let Some(mut pair) = sitelink_pair(["mmsg", "uring"], &[]) else { return };
    // Both sides talk to the middlebox, which listens in B's namespace.
    pair.endpoints = ["10.201.0.2:40000".into(), "10.201.0.2:40000".into()];
    let mut mb = Command::new("ip")
        .args(["netns", "exec", &pair.ns[1], MIDDLEBOX, "--listen", "10.201.0.2:40000"])
        .args(["--a", "10.201.0.1:51820", "--b", "10.201.0.2:51820", "--seed", "7", "--seconds", "60"])
        .args(["--loss", "0.02", "--dup", "0.03", "--reorder", "0.05", "--flip", "0.02"])
        .args(["--truncate", "0.02", "--replay", "0.03"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("middlebox");
    pair.configure();
    assert!(pair.ping_until(0, Duration::from_secs(20)).is_some(), "no ping through the middlebox");
    pair.tcp_transfer_checked(0, 2 << 20);
    pair.tcp_transfer_checked(1, 1 << 20);
    let (received, dup, bad) = pair.udp_stream_checked(0, 2000, 1000);
    assert_eq!(dup, 0, "an inner packet was delivered twice");
    assert_eq!(bad, 0, "a corrupted inner packet was delivered");
    assert!(received >= 1800, "only {received} of 2000 datagrams arrived through 2% loss");

    let a = pair.stop_and_read_counters(0);
    let b = pair.stop_and_read_counters(1);
    let _ = mb.kill();
    let out = mb.wait_with_output().expect("middlebox output");
    let report = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_owned();
    eprintln!("middlebox: {report}\nA: {a}\nB: {b}");
    for what in ["dropped", "duplicated", "reordered", "flipped", "truncated", "replayed"] {
        let n: u64 = report
            .split(&format!("{what}="))
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n > 0, "the middlebox never {what}: {report}");
    }
    // Duplicates and replays are refused by the replay window, flipped and cut messages by
    // authentication or framing; every one is counted by reason.
    let total = |r: &str| counted(&a, r) + counted(&b, r);
    assert!(total("replay") > 0, "replays not counted");
    assert!(total("decrypt_failed") > 0, "forgeries not counted");
    assert!(total("replay") + total("decrypt_failed") + total("malformed") + total("bad_mac1") > 50);
    // Keys never reach the logs.
    for side in 0..2 {
        let log = std::fs::read_to_string(pair.log_path(side)).unwrap_or_default();
        for key in &pair.keys {
            assert!(!log.contains(key.as_str()), "a private key (base64) is in a log");
            let hex: String = sitelink::PrivateKey::from_base64(key).expect("key").to_hex();
            assert!(!log.contains(&hex), "a private key (hex) is in a log");
        }
    }
}

#[test]
fn handshake_flood_is_absorbed_and_the_link_keeps_working() {
    let _serial = serial();
    let Some(mut pair) = sitelink_pair(["uring", "uring"], &[]) else { return };
    if !can_run(&["iperf3"]) {
        return;
    }
    pair.configure();
    assert!(pair.ping_until(1, Duration::from_secs(10)).is_some());
    // The attacker sits beside the legitimate peer, at another address.
    must(&format!("ip -n {} addr add 10.201.0.3/24 dev {}", pair.ns[1], pair.veth[1]));
    let flood = |pair: &Pair, target: &str, secs: u32| {
        Command::new("ip")
            .args(["netns", "exec", &pair.ns[1], FLOOD, "--target", target, "--bind", "10.201.0.3"])
            .args(["--public-key", &pair.pubs[0], "--seconds", &secs.to_string(), "--sockets", "64"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("flood")
    };

    let baseline = pair.tcp_gbps(1, 4);
    let f = flood(&pair, "10.201.0.1:51820", 6);
    std::thread::sleep(Duration::from_millis(500));
    let under_flood = pair.tcp_gbps(1, 4);
    let sent = String::from_utf8_lossy(&f.wait_with_output().expect("flood").stdout).into_owned();
    let f = flood(&pair, "10.201.0.1:9", 6);
    std::thread::sleep(Duration::from_millis(500));
    let closed_port = pair.tcp_gbps(1, 4);
    let _ = f.wait_with_output();

    // A new handshake must get through while the flood goes on: A forgets its session.
    let f = flood(&pair, "10.201.0.1:51820", 15);
    std::thread::sleep(Duration::from_millis(500));
    pair.ns_exec(0, &format!("wg set {} peer {} remove", pair.ifname[0], pair.pubs[1]));
    pair.ns_exec(
        0,
        &format!(
            "wg set {} peer {} allowed-ips 10.202.0.2/32 endpoint {}",
            pair.ifname[0], pair.pubs[1], pair.endpoints[0]
        ),
    );
    let took = pair.ping_until(0, Duration::from_secs(12));
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", pair.pid(0)))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _ = f.wait_with_output();
    let a = pair.stop_and_read_counters(0);

    let report = format!(
        "flood: {} | TCP B->A baseline {baseline:.3} Gbit/s; flood at sitelinkd {under_flood:.3} ({:.0}%); \
         flood at a closed port {closed_port:.3} ({:.0}%); re-handshake under flood took {took:?}; \
         peak RSS {rss_kib} KiB\nA: {a}",
        sent.trim(),
        100.0 * under_flood / baseline,
        100.0 * closed_port / baseline,
    );
    eprintln!("{report}");
    let _ = std::fs::write(format!("{}/flood-results.txt", env!("CARGO_TARGET_TMPDIR")), &report);
    assert!(took.is_some(), "no handshake got through the flood: {report}");
    assert!(counted(&a, "cookie_required") > 0, "never switched to cookie mode: {a}");
    assert!(counted(&a, "unknown_receiver_index") > 0 && counted(&a, "malformed") > 0, "{a}");
    assert!(rss_kib > 0 && rss_kib < 64 * 1024, "memory grew under the flood: {rss_kib} KiB");
    assert!(under_flood > 0.0, "no traffic at all during the flood");
}

#[test]
fn restarted_peer_is_back_within_one_rekey_timeout() {
    let _serial = serial();
    let Some(mut pair) = sitelink_pair(["mmsg", "uring"], &[]) else { return };
    pair.configure();
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some());
    pair.stop(1);
    pair.start(1, Impl::Sitelink("uring"));
    pair.configure_side(1);
    // Traffic from the restarted side starts a handshake at once.
    let took = pair.ping_until(1, Duration::from_secs(10)).expect("link back");
    assert!(took < Duration::from_secs(5), "took {took:?}, more than REKEY_TIMEOUT");
    assert!(pair.ping_until(0, Duration::from_secs(5)).is_some());
    pair.tcp_transfer_checked(0, 1 << 20);
}

#[test]
fn roaming_mid_transfer_keeps_the_stream_intact() {
    let _serial = serial();
    // B (the side that moves) on each backend in turn.
    roam_mid_transfer(["uring", "mmsg"]);
    roam_mid_transfer(["mmsg", "uring"]);
}

fn roam_mid_transfer(backends: [&'static str; 2]) {
    let Some(mut pair) = sitelink_pair(backends, &[]) else { return };
    pair.configure();
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some());
    let (ns_a, ns_b, veth_b, if_a) =
        (pair.ns[0].clone(), pair.ns[1].clone(), pair.veth[1].clone(), pair.ifname[0].clone());
    // Keep the new address when the old primary goes.
    must(&format!("ip netns exec {ns_b} sysctl -qw net.ipv4.conf.{veth_b}.promote_secondaries=1"));
    let mover = std::thread::spawn(move || {
        // Once the transfer is well under way (A has received 16 MB), B moves to another
        // address: its datagrams then come from 10.201.0.4.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let out = must(&format!("ip netns exec {ns_a} wg show {if_a} transfer"));
            let rx: u64 = out.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            if rx > 16 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        must(&format!("ip -n {ns_b} addr add 10.201.0.4/24 dev {veth_b}"));
        must(&format!("ip -n {ns_b} addr del 10.201.0.2/24 dev {veth_b}"));
    });
    // B sends (so its new source reaches A at once); A must follow it.
    pair.tcp_transfer_checked(1, 256 << 20);
    mover.join().expect("mover");
    let endpoints = pair.ns_exec(0, &format!("wg show {} endpoints", pair.ifname[0]));
    assert!(endpoints.contains("10.201.0.4:51820"), "A did not follow B: {endpoints}");
    pair.tcp_transfer_checked(0, 1 << 20);
    // B's socket connected to A kept the old source address: its sends failed, so it was
    // closed and the shared socket, choosing the new source, carried B on.
    let b = pair.stop_and_read_counters(1);
    assert!(b.contains("peer_sockets_stale: 1"), "B's connected socket was not retired: {b}");
}

#[test]
fn rekeys_under_continuous_traffic_lose_nothing() {
    let _serial = serial();
    // Timers scaled by 0.025: REKEY_AFTER_TIME 3 s, REJECT_AFTER_TIME 4.5 s.
    let Some(mut pair) = sitelink_pair(["uring", "mmsg"], &[("SITELINK_TEST_TIME_SCALE", "0.025")]) else {
        return;
    };
    pair.configure();
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some());
    let start = Instant::now();
    let (received, dup, bad) = pair.udp_stream_checked(0, 8000, 800);
    let elapsed = start.elapsed();
    assert_eq!((dup, bad), (0, 0));
    assert_eq!(received, 8000, "datagrams lost across rekeys");
    pair.tcp_transfer_checked(1, 4 << 20);
    let a = pair.stop_and_read_counters(0);
    let sessions: u64 = a
        .split("sessions=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(sessions >= 3, "only {sessions} sessions in {elapsed:?}: {a}");
}

#[test]
fn deleting_the_interface_stops_sitelinkd_cleanly() {
    let _serial = serial();
    let Some(mut pair) = sitelink_pair(["uring", "mmsg"], &[]) else { return };
    pair.configure();
    let socket = pair.socket(0);
    pair.ns_exec(0, &format!("ip link del {}", pair.ifname[0]));
    let status =
        pair.wait_exit(0, Duration::from_secs(5)).expect("sitelinkd kept running without its interface");
    assert!(status.success(), "exit status {status}");
    assert!(!std::path::Path::new(&socket).exists(), "UAPI socket left behind");
}

#[test]
fn config_file_configures_the_link_and_a_readable_key_is_warned_about() {
    let _serial = serial();
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut pair = Pair::new();
    for side in 0..2 {
        pair.keys[side] = must("wg genkey").trim().to_owned();
        pair.pubs[side] = must(&format!("echo {} | wg pubkey", pair.keys[side])).trim().to_owned();
    }
    // Side A is configured from a wg-quick file that everyone may read.
    let path = format!("/tmp/netns-test-{}.conf", pair.ifname[0]);
    std::fs::write(
        &path,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\n\
             AllowedIPs = 10.202.0.2/32\nEndpoint = 10.201.0.2:51820\n",
            pair.keys[0], pair.pubs[1]
        ),
    )
    .expect("config file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    pair.extra_args[0] = vec!["--config".into(), path.clone()];
    pair.start(0, Impl::Sitelink("uring"));
    pair.start(1, Impl::Sitelink("mmsg"));
    pair.ns_exec(0, &format!("ip addr add 10.202.0.1/24 dev {}", pair.ifname[0]));
    pair.ns_exec(0, &format!("ip link set {} mtu 1420 up", pair.ifname[0]));
    pair.configure_side(1);
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "link from the config file");
    let shown = pair.ns_exec(0, &format!("wg show {} listen-port", pair.ifname[0]));
    assert_eq!(shown.trim(), "51820");
    let log = std::fs::read_to_string(pair.log_path(0)).expect("log");
    let _ = std::fs::remove_file(&path);
    assert!(log.contains("readable by others"), "no warning about the key file: {log}");
    assert!(!log.contains(pair.keys[0].as_str()), "the key itself is in the log");
}

#[test]
fn a_worker_panic_makes_sitelinkd_exit_non_zero() {
    let _serial = serial();
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    let mut pair = Pair::new();
    pair.extra_args[0] = vec!["--workers".into(), "2".into(), "--test-worker-panic-after=1".into()];
    pair.start(0, Impl::Sitelink("uring"));
    let status =
        pair.wait_exit(0, Duration::from_secs(10)).expect("sitelinkd ran on after a worker panicked");
    let log = std::fs::read_to_string(pair.log_path(0)).unwrap_or_default();
    assert!(!status.success(), "a failed link exited {status}: {log}");
    assert!(
        log.contains("a worker panicked") && log.contains("injected"),
        "the panic is not in the log: {log}"
    );
    assert!(log.contains("ERROR"), "not logged as an error: {log}");
}
