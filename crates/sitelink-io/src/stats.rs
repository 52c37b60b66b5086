//! A backend's counters.

/// Counters of one backend: what moved, and every failure by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Datagrams received.
    pub udp_rx: u64,
    /// Bytes of the datagrams received (their UDP payloads).
    pub udp_rx_bytes: u64,
    /// Datagrams sent.
    pub udp_tx: u64,
    /// Packets read from the TUN side.
    pub tun_rx: u64,
    /// Bytes read from the TUN side (a super-packet's as read, without its virtio-net
    /// header, not its segments').
    pub tun_rx_bytes: u64,
    /// Packets written to the TUN side.
    pub tun_tx: u64,
    /// Datagrams the kernel refused to send (unreachable destination, full buffer, ...).
    pub udp_send_errors: u64,
    /// Datagrams received larger than a buffer (dropped).
    pub udp_truncated: u64,
    /// Receive calls that failed with something other than "no data yet".
    pub udp_recv_errors: u64,
    /// Packets the TUN side refused.
    pub tun_write_errors: u64,
    /// Reads from the TUN side that failed.
    pub tun_read_errors: u64,
    /// UDP send system calls (or submissions) made: with GSO and batching, far fewer than
    /// datagrams.
    pub send_calls: u64,
    /// Peers with a connected socket of their own now
    /// ([`PacketIo::connect_peers`](crate::PacketIo::connect_peers)): a level, not a count of
    /// events.
    pub peer_sockets: u64,
    /// Peer sockets closed because a send on them failed in a way that the socket itself
    /// causes (its source address left the host); the shared socket serves those peers.
    pub peer_sockets_stale: u64,
    /// Times the io_uring backend changed to readiness mode after the link went quiet.
    pub idle_entries: u64,
    /// TUN reads that brought a super-packet (split into `tun_rx` packets).
    pub tun_gso_reads: u64,
    /// TUN writes of a coalesced super-packet (each counted in `tun_tx` by its packets).
    pub tun_gso_writes: u64,
    /// TUN reads whose virtio-net header or super-packet was bad (dropped).
    pub tun_offload_errors: u64,
    /// Receives that brought several datagrams (UDP GRO).
    pub udp_gro_reads: u64,
    /// Datagrams of such receives that did not land one to a buffer (their size was not the
    /// one the receive was laid out for) and were copied into buffers of their own.
    pub udp_gro_copied: u64,
    /// Bulk datagrams dropped unopened because they had waited too long in the socket's
    /// receive queue (CoDel: the queue had stayed above its target delay; see `aqm.rs`).
    pub udp_queue_drops: u64,
    /// Fallback: `TUNSETOFFLOAD` was refused, so packets come in one at a time (a level: 1 if so).
    pub tun_offload_refused: u64,
    /// Fallback: the TUN device's UDP segmentation offload was refused (a level: 1 if so).
    pub uso_refused: u64,
    /// Fallback: the TUN device refused a coalesced write (`EINVAL`), so writes go one packet at a time.
    pub gro_write_refused: u64,
    /// Fallback: a UDP GSO send failed with `EIO`, so datagrams go one by one.
    pub gso_send_refused: u64,
    /// Fallback: the socket refused `UDP_GRO`, so datagrams come in one at a time (a level: 1 if so).
    pub udp_gro_refused: u64,
}

impl IoStats {
    /// Adds `other`'s counters to these (to sum the workers of one link).
    pub fn add(&mut self, other: &IoStats) {
        let IoStats {
            udp_rx,
            udp_rx_bytes,
            udp_tx,
            tun_rx,
            tun_rx_bytes,
            tun_tx,
            udp_send_errors,
            udp_truncated,
            udp_recv_errors,
            tun_write_errors,
            tun_read_errors,
            send_calls,
            peer_sockets,
            peer_sockets_stale,
            idle_entries,
            tun_gso_reads,
            tun_gso_writes,
            tun_offload_errors,
            udp_gro_reads,
            udp_gro_copied,
            udp_queue_drops,
            tun_offload_refused,
            uso_refused,
            gro_write_refused,
            gso_send_refused,
            udp_gro_refused,
        } = other;
        self.udp_rx += udp_rx;
        self.udp_rx_bytes += udp_rx_bytes;
        self.udp_tx += udp_tx;
        self.tun_rx += tun_rx;
        self.tun_rx_bytes += tun_rx_bytes;
        self.tun_tx += tun_tx;
        self.udp_send_errors += udp_send_errors;
        self.udp_truncated += udp_truncated;
        self.udp_recv_errors += udp_recv_errors;
        self.tun_write_errors += tun_write_errors;
        self.tun_read_errors += tun_read_errors;
        self.send_calls += send_calls;
        self.peer_sockets += peer_sockets;
        self.peer_sockets_stale += peer_sockets_stale;
        self.idle_entries += idle_entries;
        self.tun_gso_reads += tun_gso_reads;
        self.tun_gso_writes += tun_gso_writes;
        self.tun_offload_errors += tun_offload_errors;
        self.udp_gro_reads += udp_gro_reads;
        self.udp_gro_copied += udp_gro_copied;
        self.udp_queue_drops += udp_queue_drops;
        self.tun_offload_refused += tun_offload_refused;
        self.uso_refused += uso_refused;
        self.gro_write_refused += gro_write_refused;
        self.gso_send_refused += gso_send_refused;
        self.udp_gro_refused += udp_gro_refused;
    }
}
