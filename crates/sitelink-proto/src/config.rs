//! Configuration of a device and its peers, and IP prefixes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use sitelink_crypto::{PresharedKey, PrivateKey, PublicKey};

/// An IP prefix such as `10.0.0.0/24` or `fd00::/64`, kept with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a prefix could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpNetError {
    /// The prefix length exceeds the address size (32 or 128).
    #[error("prefix length {0} too long for the address family")]
    PrefixTooLong(u8),
    /// The text is not `ADDRESS/LENGTH` or a bare address.
    #[error("not an IP prefix: {0:?}")]
    Syntax(String),
}

impl IpNet {
    /// The prefix `addr/prefix_len`, host bits cleared.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, IpNetError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(IpNetError::PrefixTooLong(prefix_len));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if prefix_len == 0 { 0 } else { u128::MAX << (128 - prefix_len) };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(IpNet { addr, prefix_len })
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpNet::new(ip, self.prefix_len).is_ok_and(|n| n.addr == self.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// Reads `ADDRESS/LENGTH`, or a bare address as a host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let syntax = || IpNetError::Syntax(s.to_owned());
        match s.split_once('/') {
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| syntax())?;
                let len: u8 = l.parse().map_err(|_| syntax())?;
                IpNet::new(addr, len)
            }
            None => {
                let addr: IpAddr = s.parse().map_err(|_| syntax())?;
                IpNet::new(addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        }
    }
}

/// The protocol's time and message limits (WireGuard whitepaper, section 6). The defaults are
/// the protocol's; tests and fault drills may shorten them, and both ends of a link should then
/// agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// REKEY_AFTER_TIME: the initiator of a session rekeys when sending on an older keypair.
    pub rekey_after_time: Duration,
    /// REJECT_AFTER_TIME: no keypair is used past this age.
    pub reject_after_time: Duration,
    /// REKEY_ATTEMPT_TIME: how long a handshake is retried before giving up.
    pub rekey_attempt_time: Duration,
    /// REKEY_TIMEOUT: the interval between handshake retries.
    pub rekey_timeout: Duration,
    /// Random jitter of up to this is added to each handshake retry.
    pub rekey_timeout_jitter: Duration,
    /// KEEPALIVE_TIMEOUT: a keepalive follows received data this long after, if nothing was sent.
    pub keepalive_timeout: Duration,
    /// REKEY_AFTER_MESSAGES: the initiator rekeys after sending this many messages on a keypair.
    pub rekey_after_messages: u64,
    /// REJECT_AFTER_MESSAGES: no keypair sends more than this many messages.
    pub reject_after_messages: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_attempt_time: Duration::from_secs(90),
            rekey_timeout: Duration::from_secs(5),
            rekey_timeout_jitter: Duration::from_millis(333),
            keepalive_timeout: Duration::from_secs(10),
            rekey_after_messages: 1 << 60,
            reject_after_messages: sitelink_crypto::REJECT_AFTER_MESSAGES,
        }
    }
}

impl Timing {
    /// The protocol's times multiplied by `factor` (message limits unchanged), keeping every
    /// relationship between them: for tests and fault drills that want rekeys every few
    /// seconds. Both ends of a link should use the same factor.
    pub fn scaled(factor: f64) -> Timing {
        let d = Timing::default();
        let f = |t: Duration| t.mul_f64(factor.clamp(1e-4, 1e4));
        Timing {
            rekey_after_time: f(d.rekey_after_time),
            reject_after_time: f(d.reject_after_time),
            rekey_attempt_time: f(d.rekey_attempt_time),
            rekey_timeout: f(d.rekey_timeout),
            rekey_timeout_jitter: f(d.rekey_timeout_jitter),
            keepalive_timeout: f(d.keepalive_timeout),
            ..d
        }
    }

    /// How many handshake retries fit in REKEY_ATTEMPT_TIME.
    pub fn max_handshake_attempts(&self) -> u32 {
        let per = self.rekey_timeout.as_millis().max(1);
        (self.rekey_attempt_time.as_millis() / per).min(u128::from(u32::MAX)) as u32
    }
}

/// Configuration of a [`Device`](crate::Device).
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The device's private key.
    pub private_key: PrivateKey,
    /// The tunnel MTU: transport plaintext is padded up to a multiple of 16 but never past it.
    pub mtu: usize,
    /// Protocol timers and limits.
    pub timing: Timing,
    /// Packets held per peer while its handshake completes; older ones are dropped past this.
    pub max_staged_packets: usize,
    /// Handshake messages per second above which the device counts as under load: it then
    /// answers handshakes without a valid cookie with a cookie reply, and rate-limits each
    /// source address.
    pub handshake_load_threshold: u32,
    /// Handshakes accepted per second from one source address while under load.
    pub handshakes_per_source_per_second: u32,
    /// How the paths of peers with several endpoints are probed and judged.
    pub paths: crate::device::PathTiming,
}

impl DeviceConfig {
    /// A configuration with the protocol's defaults and a 1420-byte MTU.
    pub fn new(private_key: PrivateKey) -> Self {
        DeviceConfig {
            private_key,
            mtu: 1420,
            timing: Timing::default(),
            max_staged_packets: 128,
            handshake_load_threshold: 128,
            handshakes_per_source_per_second: 20,
            paths: crate::device::PathTiming::default(),
        }
    }
}

/// Configuration of one peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The peer's public key, which names it.
    pub public_key: PublicKey,
    /// The preshared key, or `None` for none.
    pub preshared_key: Option<PresharedKey>,
    /// Where to send, until the peer roams (its latest authenticated source wins). With
    /// `fallback_endpoints`, the preferred of the peer's paths.
    pub endpoint: Option<SocketAddr>,
    /// More endpoints of the peer, in order of preference after `endpoint`: one path each,
    /// watched, with failover (see [`PathTiming`](crate::PathTiming)). Empty: plain WireGuard.
    pub fallback_endpoints: Vec<SocketAddr>,
    /// Probe every path with keepalives (both ends sitelink). Turn it off against a stock
    /// WireGuard peer, which follows the source of every packet: its paths are then judged
    /// by its own packets (give it a persistent keepalive of a second), and failover starts
    /// a handshake on the next endpoint.
    pub probe_paths: bool,
    /// The inner addresses this peer may send from and is sent to.
    pub allowed_ips: Vec<IpNet>,
    /// Send a keepalive after this long without sending, to hold NAT mappings open.
    pub persistent_keepalive: Option<Duration>,
}

impl PeerConfig {
    /// A peer with only its public key set.
    pub fn new(public_key: PublicKey) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            fallback_endpoints: Vec::new(),
            probe_paths: true,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_mask() {
        let n: IpNet = "10.1.2.3/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.1.0.0/16");
        assert!(n.contains("10.1.200.1".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("fd00::1".parse().unwrap()));
        assert_eq!("fd00::1".parse::<IpNet>().unwrap().prefix_len(), 128);
        assert_eq!("0.0.0.0/0".parse::<IpNet>().unwrap().to_string(), "0.0.0.0/0");
        assert_eq!("fd00:1:2::/40".parse::<IpNet>().unwrap().to_string(), "fd00:1::/40");
        assert!(matches!("10.0.0.0/33".parse::<IpNet>(), Err(IpNetError::PrefixTooLong(33))));
        assert!(matches!("10.0.0/8".parse::<IpNet>(), Err(IpNetError::Syntax(_))));
        assert!(matches!("10.0.0.0/x".parse::<IpNet>(), Err(IpNetError::Syntax(_))));
    }

    #[test]
    fn default_attempts() {
        assert_eq!(Timing::default().max_handshake_attempts(), 18);
    }

    #[test]
    fn scaled_timing_keeps_its_proportions() {
        let t = Timing::scaled(0.025);
        assert_eq!(t.rekey_after_time, Duration::from_secs(3));
        assert_eq!(t.reject_after_time, Duration::from_millis(4500));
        assert_eq!(t.rekey_timeout, Duration::from_millis(125));
        assert_eq!(t.max_handshake_attempts(), 18);
        assert_eq!(t.rekey_after_messages, Timing::default().rekey_after_messages);
    }
}
