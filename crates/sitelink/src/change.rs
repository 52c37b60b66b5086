//! A change to a link's configuration as plain data: what a UAPI `set=1` request says, parsed
//! before anything is touched, and applied in one go by [`Link::apply`](crate::Link::apply).

use std::net::SocketAddr;

use sitelink_proto::{IpNet, PresharedKey, PrivateKey, PublicKey};

/// Changes to one peer, in the order `wg` sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    /// Which peer.
    pub public_key: PublicKey,
    /// Remove it.
    pub remove: bool,
    /// Change it only if it exists.
    pub update_only: bool,
    /// New preshared key (all zeros clears it).
    pub preshared_key: Option<PresharedKey>,
    /// New endpoint.
    pub endpoint: Option<SocketAddr>,
    /// New persistent keepalive interval in seconds (0 turns it off).
    pub persistent_keepalive: Option<u16>,
    /// Replace the allowed IPs with `allowed_ips` rather than adding to them.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add.
    pub allowed_ips: Vec<IpNet>,
    /// Allowed IPs to remove (`allowed_ip=-PREFIX`, newer wireguard-tools), applied before the
    /// additions; a prefix named both ways in one request ends as the later line says.
    pub removed_allowed_ips: Vec<IpNet>,
}

/// A parsed `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// New private key.
    pub private_key: Option<PrivateKey>,
    /// New listen port.
    pub listen_port: Option<u16>,
    /// New fwmark (0 clears it).
    pub fwmark: Option<u32>,
    /// Remove every peer first.
    pub replace_peers: bool,
    /// Peer changes, in order.
    pub peers: Vec<PeerChange>,
}
