//! Protocol paths against a peer we did not write (wireguard-go), as root between two network
//! namespaces: handshakes that complete while the responder is flooded (so cookies and MAC2
//! must be right on both sides), and reloads that must not touch a running session.
//!
//! A test between two sitelinks passes when both ends share a bug; these do not. Like the
//! other netns tests they say loudly when they cannot run, and under CI=true fail instead.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Impl, Pair, can_run, must, needs, sh};

const FLOOD: &str = env!("CARGO_BIN_EXE_flood");

/// These tests run one at a time: floods load both cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// sitelinkd on side A (uring), wireguard-go on side B, keys and endpoints set, no traffic yet.
fn sitelink_and_wireguard_go() -> Option<Pair> {
    let mut need = needs(Impl::WireguardGo);
    need.push("ping");
    if !can_run(&need) {
        return None;
    }
    let mut pair = Pair::new();
    pair.start(0, Impl::Sitelink("uring"));
    pair.start(1, Impl::WireguardGo);
    pair.configure();
    Some(pair)
}

/// Starts a flood of valid-mac1 initiations from 10.201.0.3 (an address added in `from_side`'s
/// namespace) at the other side's WireGuard port, for `secs`.
fn start_flood(pair: &Pair, from_side: usize, secs: u32) -> Child {
    let target_side = 1 - from_side;
    must(&format!("ip -n {} addr add 10.201.0.3/24 dev {}", pair.ns[from_side], pair.veth[from_side]));
    Command::new("ip")
        .args(["netns", "exec", &pair.ns[from_side], FLOOD])
        .args(["--target", &format!("10.201.0.{}:51820", target_side + 1), "--bind", "10.201.0.3"])
        .args(["--public-key", &pair.pubs[target_side], "--seconds", &secs.to_string()])
        .args(["--sockets", "64"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("flood")
}

/// The first handshake between the two sides happens while `responder` is flooded: the
/// initiator must take the cookie reply and answer with a MAC2 the responder accepts. Returns
/// how long the first ping took to get through (None: never, within 18 s) and sitelinkd's
/// final counters; None when the test cannot run here.
fn handshake_under_flood(responder: usize) -> Option<(Option<Duration>, String)> {
    let _serial = serial();
    let mut pair = sitelink_and_wireguard_go()?;
    let initiator = 1 - responder;
    let flood = start_flood(&pair, initiator, 25);
    // Let the flood put the responder under load before the first initiation goes out.
    std::thread::sleep(Duration::from_millis(1500));
    let took = pair.ping_until(initiator, Duration::from_secs(18));
    let handshake = pair.latest_handshake(initiator);
    let out = flood.wait_with_output().expect("flood");
    let sent = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let counters = pair.stop_and_read_counters(0);
    let role = if responder == 0 {
        "wireguard-go -> flooded sitelinkd"
    } else {
        "sitelinkd -> flooded wireguard-go"
    };
    eprintln!("{role} ({sent}): first ping after {took:?}\nsitelinkd: {counters}");
    if took.is_some() {
        assert!(handshake > 0, "ping got through but no handshake is shown");
    }
    Some((took, counters))
}

#[test]
fn sitelink_initiates_to_flooded_wireguard_go() {
    // sitelinkd on side A initiates; wireguard-go on B is flooded and demands MAC2.
    let Some((took, _)) = handshake_under_flood(1) else { return };
    assert!(took.is_some(), "no handshake completed with a flooded wireguard-go responder");
}

#[test]
fn wireguard_go_initiates_to_flooded_sitelink() {
    // wireguard-go on side B initiates; sitelinkd on A is flooded and demands MAC2.
    let Some((took, counters)) = handshake_under_flood(0) else { return };
    assert!(counters.contains("cookie_required"), "sitelinkd never demanded a cookie: {counters}");
    assert!(took.is_some(), "no handshake completed from wireguard-go to a flooded sitelinkd");
}

/// Pings from `side` to the other at 20 per second for `count` in the background.
fn start_pings(pair: &Pair, side: usize, count: u32) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &pair.ns[side], "ping", "-i", "0.05", "-W", "1", "-c", &count.to_string()])
        .arg(format!("10.202.0.{}", 2 - side))
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping")
}

/// How many of the background pings were answered, and how many were sent.
fn ping_result(ping: Child) -> (u32, u32) {
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default();
    let num = |what: &str| -> u32 {
        line.split(',')
            .find(|f| f.contains(what))
            .and_then(|f| f.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("received"), num("transmitted"))
}

#[test]
fn unchanged_reloads_keep_the_session_with_wireguard_go() {
    let _serial = serial();
    let Some(pair) = sitelink_and_wireguard_go() else { return };
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "no link");
    let if_a = &pair.ifname[0];
    let before = (pair.latest_handshake(0), pair.latest_handshake(1));
    // wg shows handshake times in seconds: let a new handshake be visible as a change.
    std::thread::sleep(Duration::from_millis(1100));
    let ping = start_pings(&pair, 0, 80);
    std::thread::sleep(Duration::from_millis(500));

    // The standard hitless reload, with nothing changed.
    let conf = format!("/tmp/netns-test-{if_a}.conf");
    let keyfile = format!("/tmp/netns-test-{if_a}.key");
    pair.ns_exec(0, &format!("sh -c 'wg showconf {if_a} > {conf}'"));
    pair.ns_exec(0, &format!("wg syncconf {if_a} {conf}"));
    std::thread::sleep(Duration::from_millis(500));
    // The same private key, listen port and peer set again one by one.
    std::fs::write(&keyfile, &pair.keys[0]).expect("key file");
    pair.ns_exec(0, &format!("wg set {if_a} private-key {keyfile}"));
    pair.ns_exec(0, &format!("wg set {if_a} listen-port 51820"));
    pair.ns_exec(
        0,
        &format!(
            "wg set {if_a} peer {} allowed-ips 10.202.0.2/32 endpoint {}",
            pair.pubs[1], pair.endpoints[0]
        ),
    );
    let _ = std::fs::remove_file(&keyfile);
    let _ = std::fs::remove_file(&conf);

    let (received, sent) = ping_result(ping);
    let after = (pair.latest_handshake(0), pair.latest_handshake(1));
    eprintln!("unchanged reloads: {received} of {sent} pings answered; handshakes {before:?} -> {after:?}");
    assert_eq!(sent, 80, "ping did not run");
    assert_eq!(received, sent, "pings lost across unchanged reloads");
    assert_eq!(after, before, "an unchanged reload started a new handshake");
}

#[test]
fn a_new_listen_port_moves_traffic_without_a_new_handshake() {
    let _serial = serial();
    let Some(pair) = sitelink_and_wireguard_go() else { return };
    assert!(pair.ping_until(0, Duration::from_secs(10)).is_some(), "no link");
    let before = pair.latest_handshake(0);
    std::thread::sleep(Duration::from_millis(1100));
    let ping = start_pings(&pair, 0, 60);
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    pair.ns_exec(0, &format!("wg set {} listen-port 51899", pair.ifname[0]));
    let set_took = t.elapsed();
    let (received, sent) = ping_result(ping);
    let endpoint = pair.ns_exec(1, &format!("wg show {} endpoints", pair.ifname[1]));
    let after = pair.latest_handshake(0);
    eprintln!(
        "new listen port: {received} of {sent} pings answered (set took {set_took:?}); B sees {endpoint}"
    );
    assert!(endpoint.contains(":51899"), "wireguard-go did not follow the new port: {endpoint}");
    // A ping every 50 ms: at most two in flight while the sockets switch.
    assert!(received + 2 >= sent, "{} pings lost moving the port", sent - received);
    assert_eq!(after, before, "moving the port started a new handshake");
    let (ok, _) = sh(&format!("ip netns exec {} ping -c 1 -W 1 10.202.0.2", pair.ns[0]));
    assert!(ok, "no link after the port moved");
}
