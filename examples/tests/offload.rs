//! The offload fallbacks, as root: each kernel refusal sitelinkd has a fallback for is forced
//! on one side (`SITELINK_TEST_REFUSE`, read by sitelink-io's I/O calls), and the link must
//! still carry a TCP stream checked end to end both ways, count the fallback in its final
//! counters and say it in the log. `--no-offload` is checked the same way, against a peer with
//! offloads on.
//!
//! Without root these tests say so loudly and pass; with `CI=true` they must run.

mod common;

use common::{Impl, Pair, can_run, io_counter, needs};

/// sitelinkd on both sides (`backend` on side A), side A started with `refuse` forced and
/// `args`; TCP both ways. Returns side A's final counters line and its log.
fn with_side_a(backend: &'static str, refuse: &str, args: &[&str]) -> Option<(String, String)> {
    if !can_run(&needs(Impl::Sitelink(backend))) {
        return None;
    }
    let mut pair = Pair::new();
    if !refuse.is_empty() {
        pair.side_env[0].push(("SITELINK_TEST_REFUSE".into(), refuse.into()));
    }
    pair.extra_args[0] = args.iter().map(|a| (*a).to_owned()).collect();
    pair.start(0, Impl::Sitelink(backend));
    pair.start(1, Impl::Sitelink("uring"));
    pair.configure();
    pair.ns_exec(0, "ping -c 3 -i 0.2 -W 3 10.202.0.2");
    pair.tcp_transfer_checked(0, 8 << 20);
    pair.tcp_transfer_checked(1, 8 << 20);
    let last = pair.stop_and_read_counters(0);
    let log = std::fs::read_to_string(pair.log_path(0)).expect("log");
    Some((last, log))
}

#[test]
fn tun_offloads_refused_packets_come_one_at_a_time() {
    for backend in ["uring", "mmsg"] {
        let Some((last, log)) = with_side_a(backend, "tun-offload", &[]) else { return };
        assert_eq!(io_counter(&last, "tun_offload_refused"), 1, "{last}");
        assert_eq!(io_counter(&last, "tun_gso_reads"), 0, "{last}");
        assert_eq!(io_counter(&last, "tun_gso_writes"), 0, "no coalescing without TSO: {last}");
        assert!(log.contains("TUN offloads refused"), "not logged: {log}");
    }
}

#[test]
fn uso_refused_keeps_the_tcp_offloads() {
    let Some((last, log)) = with_side_a("uring", "uso", &[]) else { return };
    assert_eq!(io_counter(&last, "uso_refused"), 1, "{last}");
    assert_eq!(io_counter(&last, "tun_offload_refused"), 0, "{last}");
    assert!(io_counter(&last, "tun_gso_reads") > 0, "{last}");
    assert!(log.contains("UDP segmentation offload refused"), "not logged: {log}");
}

#[test]
fn einval_on_coalesced_writes_turns_coalescing_off() {
    for backend in ["uring", "mmsg"] {
        let Some((last, log)) = with_side_a(backend, "gro-write", &[]) else { return };
        assert_eq!(io_counter(&last, "gro_write_refused"), 1, "{last}");
        assert_eq!(io_counter(&last, "tun_gso_writes"), 0, "{last}");
        assert!(io_counter(&last, "tun_tx") > 1000, "{last}");
        assert!(log.contains("refused a coalesced write"), "not logged: {log}");
    }
}

#[test]
fn eio_on_gso_sends_turns_gso_off() {
    for backend in ["uring", "mmsg"] {
        let Some((last, log)) = with_side_a(backend, "gso-send", &[]) else { return };
        assert_eq!(io_counter(&last, "gso_send_refused"), 1, "{last}");
        assert!(log.contains("UDP GSO refused"), "not logged: {log}");
    }
}

#[test]
fn udp_gro_refused_datagrams_come_one_at_a_time() {
    for backend in ["uring", "mmsg"] {
        let Some((last, log)) = with_side_a(backend, "udp-gro", &[]) else { return };
        assert_eq!(io_counter(&last, "udp_gro_refused"), 1, "{last}");
        assert_eq!(io_counter(&last, "udp_gro_reads"), 0, "{last}");
        assert!(io_counter(&last, "tun_gso_reads") > 0, "the TUN offloads stay: {last}");
        assert!(log.contains("UDP GRO refused"), "not logged: {log}");
    }
}

#[test]
fn no_offload_moves_plain_packets_against_a_peer_with_offloads() {
    for backend in ["uring", "mmsg"] {
        let Some((last, _)) = with_side_a(backend, "", &["--no-offload"]) else { return };
        for counter in ["tun_gso_reads", "tun_gso_writes", "udp_gro_reads", "tun_offload_refused"] {
            assert_eq!(io_counter(&last, counter), 0, "{counter}: {last}");
        }
        assert!(io_counter(&last, "tun_rx") > 1000 && io_counter(&last, "udp_rx") > 1000, "{last}");
    }
}

#[test]
fn with_offloads_both_ways_super_packets_cross_and_runs_come_in() {
    for backend in ["uring", "mmsg"] {
        let Some((last, _)) = with_side_a(backend, "", &[]) else { return };
        for counter in ["tun_gso_reads", "tun_gso_writes", "udp_gro_reads"] {
            assert!(io_counter(&last, counter) > 0, "{counter}: {last}");
        }
        assert_eq!(io_counter(&last, "tun_offload_errors"), 0, "{last}");
    }
}

/// A burst of one UDP flow's datagrams into the tunnel comes out of the receiver's TUN device
/// as USO super-packets (the kernel cuts them up for the socket): every datagram arrives whole
/// and once, and the receiver made coalesced writes though no TCP ran.
#[test]
fn udp_runs_are_written_as_super_packets() {
    for backend in ["uring", "mmsg"] {
        if !can_run(&needs(Impl::Sitelink(backend))) {
            return;
        }
        let mut pair = Pair::new();
        pair.start(0, Impl::Sitelink(backend));
        pair.start(1, Impl::Sitelink("uring"));
        pair.configure();
        pair.ns_exec(1, "ping -c 3 -i 0.2 -W 3 10.202.0.1");
        let (received, duplicates, corrupted) = pair.udp_stream_checked(1, 3000, 30_000);
        assert_eq!((duplicates, corrupted), (0, 0), "{backend}");
        assert!(received >= 2700, "{backend}: {received} of 3000 arrived");
        let last = pair.stop_and_read_counters(0);
        assert!(io_counter(&last, "tun_gso_writes") > 0, "{backend}: no UDP run written whole: {last}");
        assert_eq!(io_counter(&last, "tun_write_errors"), 0, "{backend}: {last}");
    }
}
