//! Several underlay paths per peer, in the simulated-clock harness: a numbered flow of 1,000
//! packets a second from node 0 to node 1 while paths die silently, come back, flap; the
//! longest run of lost packets and the active path are checked at every step.

use std::collections::BTreeSet;
use std::time::Duration;

use sitelink_proto::sim::{Net, node_key};
use sitelink_proto::{PathSwitch, PathSwitchReason, PathTiming, PeerId};

fn peer_of(net: &Net, node: usize, other: usize) -> PeerId {
    net.nodes[node].dev.peer_by_key(&node_key(other).public_key()).unwrap()
}

/// Node `node`'s active endpoint for `other`.
fn endpoint(net: &Net, node: usize, other: usize) -> std::net::SocketAddr {
    net.nodes[node].dev.peer(peer_of(net, node, other)).unwrap().endpoint().unwrap()
}

/// A flow of numbered packets, one a millisecond, from node `from` to node `to`.
struct Flow {
    from: usize,
    to: usize,
    next: u32,
    /// Sequence numbers delivered, and when (ms since the flow began).
    delivered: Vec<(u32, u64)>,
    start: std::time::Instant,
}

impl Flow {
    fn new(net: &Net) -> Flow {
        Flow::between(net, 0, 1)
    }

    fn between(net: &Net, from: usize, to: usize) -> Flow {
        Flow { from, to, next: 0, delivered: Vec::new(), start: net.now }
    }

    /// Runs the flow for `ms` milliseconds, then runs `then` (a change to the network).
    fn run(&mut self, net: &mut Net, ms: u64) {
        for _ in 0..ms {
            net.send(self.from, self.to, &self.next.to_be_bytes());
            self.next += 1;
            net.run_for(Duration::from_millis(1));
            for p in net.take_delivered(self.to) {
                let seq = u32::from_be_bytes(p[..4].try_into().unwrap());
                self.delivered.push((seq, net.now.duration_since(self.start).as_millis() as u64));
            }
        }
    }

    /// The longest run of consecutive sequence numbers never delivered, in packets (= ms),
    /// and a check that nothing came twice.
    fn longest_loss(&self) -> u32 {
        let mut seen = BTreeSet::new();
        for (seq, _) in &self.delivered {
            assert!(seen.insert(*seq), "packet {seq} delivered twice");
        }
        let (mut longest, mut run) = (0, 0);
        for seq in 0..self.next.saturating_sub(20) {
            if seen.contains(&seq) {
                run = 0;
            } else {
                run += 1;
                longest = longest.max(run);
            }
        }
        longest
    }
}

fn switches(net: &mut Net, node: usize) -> Vec<PathSwitch> {
    let mut out = Vec::new();
    net.nodes[node].dev.take_path_switches(&mut out);
    out
}

#[test]
fn a_silent_path_fails_over_within_a_second_and_traffic_returns_after_the_hold_down() {
    let mut net = Net::multipath_pair(41);
    let (b0, b1) = (net.nodes[1].addr, net.nodes[1].extra_addrs[0]);
    let mut flow = Flow::new(&net);
    flow.run(&mut net, 2000);
    assert_eq!(endpoint(&net, 0, 1), b0, "the preferred path carries the traffic");
    let before = flow.longest_loss();

    net.down_paths = vec![0];
    flow.run(&mut net, 3000);
    assert_eq!(endpoint(&net, 0, 1), b1, "failed over to the second path");
    assert_eq!(endpoint(&net, 1, 0), net.nodes[0].extra_addrs[0], "and so did the far end");
    let lost = flow.longest_loss();
    assert!(lost <= 1000, "{lost} packets in a row lost (1 ms each)");
    let s = switches(&mut net, 0);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].from, s[0].to, s[0].reason), (Some(b0), b1, PathSwitchReason::ActiveDied));

    net.down_paths.clear();
    flow.run(&mut net, 2000);
    assert_eq!(endpoint(&net, 0, 1), b1, "not back before the hold-down");
    flow.run(&mut net, 2000);
    assert_eq!(endpoint(&net, 0, 1), b0, "back on the preferred path after it held up");
    assert_eq!(switches(&mut net, 0)[0].reason, PathSwitchReason::BetterPathBack);
    assert_eq!(flow.longest_loss(), lost, "the return lost nothing");

    // Now the second path dies while the first carries the traffic: nothing is lost beyond
    // the probes' own datagrams on it.
    net.down_paths = vec![1];
    flow.run(&mut net, 2000);
    assert_eq!(endpoint(&net, 0, 1), b0);
    assert_eq!(flow.longest_loss(), lost);
    eprintln!("longest loss: before {before} ms, at the failover {lost} ms");

    let paths = net.nodes[0].dev.peer(peer_of(&net, 0, 1)).unwrap().paths();
    assert_eq!(paths.len(), 2);
    assert!(paths[0].alive && paths[0].active && !paths[1].alive && !paths[1].active, "{paths:?}");
    assert_eq!((paths[0].switches_to, paths[1].switches_to), (1, 1));
}

#[test]
fn the_second_path_dying_after_the_first_came_back_is_also_survived() {
    let mut net = Net::multipath_pair(42);
    let mut flow = Flow::new(&net);
    flow.run(&mut net, 1000);
    net.down_paths = vec![0];
    flow.run(&mut net, 2000);
    net.down_paths.clear();
    flow.run(&mut net, 4000);
    assert_eq!(endpoint(&net, 0, 1), net.nodes[1].addr);
    // Path 0 carries the traffic; path 0 now dies again, then path 1 once 0 is back.
    net.down_paths = vec![0];
    flow.run(&mut net, 2000);
    net.down_paths = vec![1];
    flow.run(&mut net, 3000);
    assert_eq!(endpoint(&net, 0, 1), net.nodes[1].addr, "path 1 died: back on path 0 at once");
    assert!(flow.longest_loss() <= 1000, "{} lost in a row", flow.longest_loss());
}

#[test]
fn when_every_path_is_dead_the_first_to_return_takes_the_traffic() {
    let mut net = Net::multipath_pair(43);
    let mut flow = Flow::new(&net);
    flow.run(&mut net, 1000);
    net.down_paths = vec![0, 1];
    flow.run(&mut net, 3000);
    net.down_paths = vec![0];
    flow.run(&mut net, 2000);
    assert_eq!(endpoint(&net, 0, 1), net.nodes[1].extra_addrs[0]);
    let delivered_late = flow.delivered.iter().filter(|(_, at)| *at >= 5000).count();
    assert!(delivered_late > 900, "only {delivered_late} of the last second's packets arrived");
}

#[test]
fn a_flapping_path_does_not_take_the_traffic_back() {
    let mut net = Net::multipath_pair(44);
    let mut flow = Flow::new(&net);
    flow.run(&mut net, 1000);
    net.down_paths = vec![0];
    flow.run(&mut net, 1500);
    let _ = switches(&mut net, 0);
    // Path 0 comes and goes every 1.5 s, never up for the hold-down (3 s).
    for _ in 0..4 {
        net.down_paths.clear();
        flow.run(&mut net, 1500);
        net.down_paths = vec![0];
        flow.run(&mut net, 1500);
    }
    assert!(switches(&mut net, 0).is_empty(), "the traffic followed a flapping path");
    assert_eq!(endpoint(&net, 0, 1), net.nodes[1].extra_addrs[0]);
}

#[test]
fn probes_cost_a_few_hundred_bytes_a_second_and_stop_when_the_link_is_idle() {
    let mut net = Net::multipath_pair(45);
    let timing = PathTiming::default();
    net.send(0, 1, b"start");
    net.run_for(Duration::from_secs(1));
    let pid = peer_of(&net, 0, 1);
    let probes = |net: &Net| -> (u64, u64) {
        let paths = net.nodes[0].dev.peer(pid).unwrap().paths();
        (paths.iter().map(|p| p.probes_sent).sum(), paths.iter().map(|p| p.probe_bytes).sum())
    };
    let (n0, b0) = probes(&net);
    net.send(0, 1, b"still in use");
    net.run_for(Duration::from_secs(5));
    let (n1, b1) = probes(&net);
    let per_path_per_second = (b1 - b0) as f64 / 5.0 / 2.0;
    eprintln!(
        "{} probes in 5 s on 2 paths: {per_path_per_second:.0} B/s per path (WireGuard bytes)",
        n1 - n0
    );
    assert!(n1 - n0 >= 2 * 5 * (1000 / timing.probe_interval.as_millis() as u64) - 4);
    assert!(per_path_per_second < 400.0, "{per_path_per_second} B/s per path");
    // Idle: no data for KEEPALIVE_TIMEOUT (10 s), then no probes.
    net.run_for(Duration::from_secs(12));
    let (n2, _) = probes(&net);
    net.run_for(Duration::from_secs(10));
    assert_eq!(probes(&net).0, n2, "probes went on over an idle link");
}

#[test]
fn the_endpoint_list_changes_live_and_one_endpoint_ends_the_watching() {
    let mut net = Net::multipath_pair(46);
    let mut flow = Flow::new(&net);
    flow.run(&mut net, 1000);
    // The list reversed: traffic moves to the new preferred endpoint.
    let (b0, b1) = (net.nodes[1].addr, net.nodes[1].extra_addrs[0]);
    let pid = peer_of(&net, 0, 1);
    let mut pc = sitelink_proto::PeerConfig::new(node_key(1).public_key());
    pc.endpoint = Some(b1);
    pc.fallback_endpoints = vec![b0];
    pc.allowed_ips = vec![sitelink_proto::IpNet::new(net.nodes[1].inner.into(), 32).unwrap()];
    let now = net.now;
    net.nodes[0].dev.upsert_peer(now, pc).unwrap();
    assert_eq!(endpoint(&net, 0, 1), b0, "the endpoint in use is still listed: it stays");
    flow.run(&mut net, 4000);
    assert_eq!(endpoint(&net, 0, 1), b1, "the new preferred endpoint takes over after its hold-down");
    // `wg set ... endpoint` sets one endpoint: plain WireGuard from then on.
    net.nodes[0].dev.set_endpoint(pid, b0).unwrap();
    assert!(net.nodes[0].dev.peer(pid).unwrap().paths().is_empty());
    flow.run(&mut net, 1000);
    assert!(flow.longest_loss() <= 20, "{} lost in a row", flow.longest_loss());
}

/// Node 1 behaves as a stock WireGuard peer: one endpoint for node 0 (it follows node 0's
/// source address as it roams), a persistent keepalive of 1 s, no probes. Node 0 knows both
/// of node 1's addresses and does not probe, so it judges the path by node 1's packets: the
/// flow runs from node 1. (A stock peer that only receives sends a keepalive only every
/// KEEPALIVE_TIMEOUT, 10 s: that is the limit of judging it by its packets.)
#[test]
fn an_unprobed_peer_is_judged_by_its_own_packets_and_followed_to_the_next_endpoint() {
    let mut net = Net::new(47);
    for i in 0..2 {
        net.add_node(|_| {});
        net.nodes[i].extra_addrs.push(std::net::SocketAddr::from(([203, 0, 113, 1 + i as u8], 51820)));
    }
    net.add_multipath_peer(0, 1, false);
    net.add_peer(1, 0, None);
    let now = net.now;
    let p10 = peer_of(&net, 1, 0);
    net.nodes[1].dev.set_persistent_keepalive(now, p10, Some(Duration::from_secs(1))).unwrap();
    let mut flow = Flow::between(&net, 1, 0);
    flow.run(&mut net, 2000);
    let sent_probes: u64 =
        net.nodes[0].dev.peer(peer_of(&net, 0, 1)).unwrap().paths().iter().map(|p| p.probes_sent).sum();
    assert_eq!(sent_probes, 0, "an unprobed peer gets no probes");
    net.down_paths = vec![0];
    flow.run(&mut net, 4000);
    assert_eq!(endpoint(&net, 0, 1), net.nodes[1].extra_addrs[0]);
    assert_eq!(endpoint(&net, 1, 0), net.nodes[0].extra_addrs[0], "the stock peer followed");
    let lost = flow.longest_loss();
    assert!(lost <= 3000, "{lost} packets in a row lost");
    eprintln!("unprobed failover: {lost} ms lost");
}

/// A single endpoint is plain WireGuard: no path state, no probes, roaming as before; so is
/// one endpoint listed twice.
#[test]
fn one_endpoint_is_plain_wireguard() {
    let mut net = Net::pair(49);
    let mut pc = sitelink_proto::PeerConfig::new(node_key(1).public_key());
    pc.endpoint = Some(net.nodes[1].addr);
    pc.fallback_endpoints = vec![net.nodes[1].addr];
    pc.allowed_ips = vec![sitelink_proto::IpNet::new(net.nodes[1].inner.into(), 32).unwrap()];
    let now = net.now;
    net.nodes[0].dev.upsert_peer(now, pc).unwrap();
    net.send(0, 1, b"x");
    net.move_node(1, "192.0.2.99:4000".parse().unwrap());
    net.send(1, 0, b"roamed");
    net.run_for(Duration::from_secs(2));
    assert_eq!(endpoint(&net, 0, 1), "192.0.2.99:4000".parse().unwrap(), "roams as plain WireGuard");
    assert!(net.nodes[0].dev.peer(peer_of(&net, 0, 1)).unwrap().paths().is_empty());

    let mut net = Net::pair(48);
    net.send(0, 1, b"x");
    net.run_for(Duration::from_secs(2));
    assert!(net.nodes[0].dev.peer(peer_of(&net, 0, 1)).unwrap().paths().is_empty());
    let mut out = Vec::new();
    net.nodes[0].dev.take_path_switches(&mut out);
    assert!(out.is_empty());
}
