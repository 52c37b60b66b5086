//! Failover across two underlay paths, as root: two namespaces joined by two veth pairs
//! (10.201.0.0/24 and 10.203.0.0/24), sitelinkd in A, sitelinkd or wireguard-go in B, a
//! numbered UDP flow of 1,000 datagrams a second through the tunnel, and one path at a time
//! taken down at B's end (A's end keeps its link: it sees nothing but silence), then restored.
//!
//! Without root or the programs these tests say so loudly and pass; with `CI=true` they must
//! run and fail instead. Namespaces, interfaces and processes are removed by a guard, even
//! when a test fails.

mod common;

use std::time::Duration;

use common::{Impl, Pair, can_run, needs};

/// Writes a sitelinkd configuration file for `side` and returns its path: the keys chosen
/// by `pair.configure_keys`, the other side as the one peer, at `endpoints` in order.
fn config_file(pair: &Pair, side: usize, endpoints: &str, extra: &str) -> String {
    let other = 1 - side;
    let path = format!("/tmp/multipath-{}.conf", pair.ifname[side]);
    let text = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.202.0.{}/32\n\
         Endpoint = {endpoints}\n{extra}",
        pair.keys[side],
        pair.pubs[other],
        other + 1
    );
    std::fs::write(&path, text).expect("config");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("mode");
    path
}

fn keys(pair: &mut Pair) {
    for side in 0..2 {
        pair.keys[side] = common::must("wg genkey").trim().to_owned();
        pair.pubs[side] = common::must(&format!("echo {} | wg pubkey", pair.keys[side])).trim().to_owned();
    }
}

fn tunnel_address(pair: &Pair, side: usize) {
    pair.ns_exec(side, &format!("ip addr add 10.202.0.{}/24 dev {}", side + 1, pair.ifname[side]));
    pair.ns_exec(side, &format!("ip link set {} mtu 1420 up", pair.ifname[side]));
}

/// `ip link set DEV up|down` in B's namespace: a path cut (or mended) at B's end.
fn set_b_end(pair: &Pair, dev: &str, up: bool) {
    pair.ns_exec(1, &format!("ip link set {dev} {}", if up { "up" } else { "down" }));
}

/// Packets and bytes A sent and received on its end of path 1, from `ip -s link`.
fn link_counters(pair: &Pair, dev: &str) -> (u64, u64, u64, u64) {
    let out = pair.ns_exec(0, &format!("ip -s -j link show {dev}"));
    let num = |key: &str, which: &str| -> u64 {
        let at = out.find(&format!("\"{which}\":")).expect("stats");
        let rest = &out[at..];
        let k = rest.find(&format!("\"{key}\":")).expect(key);
        rest[k + key.len() + 3..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (num("packets", "tx"), num("bytes", "tx"), num("packets", "rx"), num("bytes", "rx"))
}

fn switches_logged(pair: &Pair, side: usize) -> Vec<String> {
    let log = std::fs::read_to_string(pair.log_path(side)).expect("log");
    log.lines().filter(|l| l.contains("moved to another path")).map(str::to_owned).collect()
}

#[test]
fn two_sitelinkds_fail_over_within_a_second_each_way() {
    if !can_run(&needs(Impl::Sitelink("uring"))) {
        return;
    }
    let mut pair = Pair::new();
    let second = pair.add_second_path();
    keys(&mut pair);
    let a = config_file(&pair, 0, "10.201.0.2:51820, 10.203.0.2:51820", "");
    let b = config_file(&pair, 1, "10.201.0.1:51820, 10.203.0.1:51820", "");
    pair.extra_args = [vec!["--config".into(), a.clone()], vec!["--config".into(), b.clone()]];
    pair.start(0, Impl::Sitelink("uring"));
    pair.start(1, Impl::Sitelink("mmsg"));
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    tunnel_address(&pair, 0);
    tunnel_address(&pair, 1);
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "no link");

    // 13 s of flow: path 0 dies at 3 s and returns at 6 s; path 1, which carries the traffic
    // until path 0 has held up for 3 s, dies at 7.5 s and returns at 10 s.
    let flow = pair.start_gap_flow(0, 1000, 13_000);
    let at = |s: f64, start: std::time::Instant| {
        let due = start + Duration::from_secs_f64(s);
        std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    };
    let start = flow.start;
    at(2.0, start);
    let before = link_counters(&pair, &second[0]);
    at(3.0, start);
    let after = link_counters(&pair, &second[0]);
    set_b_end(&pair, &pair.veth[1], false);
    at(6.0, start);
    set_b_end(&pair, &pair.veth[1], true);
    at(7.5, start);
    set_b_end(&pair, &second[1], false);
    at(10.0, start);
    set_b_end(&pair, &second[1], true);
    let report = flow.finish();

    // Probe traffic on the idle path, while path 0 carried the flow (both directions).
    let (tx_p, tx_b, rx_p, rx_b) =
        (after.0 - before.0, after.1 - before.1, after.2 - before.2, after.3 - before.3);
    let a_switches = switches_logged(&pair, 0);
    let report_text = format!(
        "{report:?}; probes on the idle path over 1 s: A sent {tx_p} datagrams / {tx_b} bytes, \
         received {rx_p} / {rx_b}; A's switches: {a_switches:#?}"
    );
    eprintln!("{report_text}");
    let _ = std::fs::write(format!("{}/multipath-results.txt", env!("CARGO_TARGET_TMPDIR")), &report_text);
    assert_eq!((report.duplicates, report.corrupted), (0, 0), "{report_text}");
    assert!(report.longest_loss <= 1000, "{} datagrams in a row lost: {report_text}", report.longest_loss);
    assert!(report.received + 3000 >= report.sent, "{report_text}");
    assert!(a_switches.len() >= 2, "A should have switched at least twice: {report_text}");
    assert!(tx_b < 1000 && rx_b < 1000, "probes cost more than a few hundred bytes a second: {report_text}");
    assert!(tx_p > 0 && rx_p > 0, "no probes on the idle path: {report_text}");
}

#[test]
fn sitelinkd_follows_wireguard_go_to_its_second_address_within_three_seconds() {
    if !can_run(&needs(Impl::WireguardGo)) {
        return;
    }
    let mut pair = Pair::new();
    let _second = pair.add_second_path();
    keys(&mut pair);
    let a = config_file(&pair, 0, "10.201.0.2:51820, 10.203.0.2:51820", "ProbePaths = off\n");
    pair.extra_args = [vec!["--config".into(), a.clone()], vec![]];
    pair.start(0, Impl::Sitelink("uring"));
    pair.start(1, Impl::WireguardGo);
    let _ = std::fs::remove_file(&a);
    let keyfile = format!("/tmp/multipath-{}.key", pair.ifname[1]);
    std::fs::write(&keyfile, &pair.keys[1]).expect("key");
    pair.ns_exec(
        1,
        &format!(
            "wg set {} private-key {keyfile} listen-port 51820 peer {} allowed-ips 10.202.0.1/32 \
             endpoint 10.201.0.1:51820 persistent-keepalive 1",
            pair.ifname[1], pair.pubs[0]
        ),
    );
    let _ = std::fs::remove_file(&keyfile);
    tunnel_address(&pair, 0);
    tunnel_address(&pair, 1);
    assert!(pair.ping_until(1, Duration::from_secs(10)).is_some(), "no link");

    // wireguard-go sends the flow (sitelinkd judges the path by its packets); path 0 dies at
    // its end at 3 s.
    let flow = pair.start_gap_flow(1, 1000, 9_000);
    std::thread::sleep(
        (flow.start + Duration::from_secs(3)).saturating_duration_since(std::time::Instant::now()),
    );
    set_b_end(&pair, &pair.veth[1], false);
    let report = flow.finish();
    let endpoint = pair.ns_exec(1, &format!("wg show {} endpoints", pair.ifname[1]));
    let text = format!(
        "{report:?}; wireguard-go's endpoint for sitelinkd: {endpoint}; {:#?}",
        switches_logged(&pair, 0)
    );
    eprintln!("{text}");
    assert!(endpoint.contains("10.203.0.1:51820"), "wireguard-go did not follow: {text}");
    assert_eq!((report.duplicates, report.corrupted), (0, 0), "{text}");
    assert!(report.longest_loss <= 3000, "{} datagrams in a row lost: {text}", report.longest_loss);
}
