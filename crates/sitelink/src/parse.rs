//! Values the wg-quick files ([`crate::conf`]) and the UAPI ([`crate::uapi`]) both read:
//! endpoints, and key names as an error message may show them.

use std::net::{SocketAddr, ToSocketAddrs};

/// Reads an endpoint as `ip:port` or `[ipv6]:port` (numeric, as `wg` sends it).
pub fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok()
}

/// Like [`parse_endpoint`], but a `name:port` is resolved through the system resolver.
pub fn resolve_endpoint(s: &str) -> Option<SocketAddr> {
    if let Some(a) = parse_endpoint(s) {
        return Some(a);
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || host.contains(['[', ']', ' ']) {
        return None;
    }
    (host, port).to_socket_addrs().ok()?.next()
}

/// A key name as an error message may show it: the name itself when it looks like one (short,
/// letters, digits, `_`, `-`, brackets), else a placeholder. A line that is not `Key = Value`
/// (a key pasted on its own, `PrivateKey` without its `=`, whose base64 then ends at the
/// key's own padding) must not put key material into a log.
pub(crate) fn shown_key(key: &str) -> String {
    let plain = key.len() <= 32
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '[' | ']'));
    if plain { key.to_owned() } else { format!("(a {}-character name, not shown)", key.chars().count()) }
}
