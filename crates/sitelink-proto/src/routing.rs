//! Cryptokey routing: the longest-prefix-match table from inner addresses to peers.
//!
//! One binary trie per address family, its nodes in a vector. A lookup walks at most 32 (IPv4)
//! or 128 (IPv6) nodes, touching no allocator; changes happen on the control path only.

use std::net::IpAddr;

use crate::config::IpNet;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node<T> {
    child: [u32; 2],
    value: Option<T>,
}

#[derive(Debug, Clone)]
struct Trie<T> {
    nodes: Vec<Node<T>>,
}

impl<T: Copy + PartialEq> Trie<T> {
    fn new() -> Self {
        Trie { nodes: vec![Node { child: [NONE; 2], value: None }] }
    }

    fn insert(&mut self, key: u128, bits: u8, len: u8, value: T) {
        let mut n = 0usize;
        for i in 0..len {
            let bit = ((key >> (bits - 1 - i)) & 1) as usize;
            if self.nodes[n].child[bit] == NONE {
                self.nodes.push(Node { child: [NONE; 2], value: None });
                self.nodes[n].child[bit] = (self.nodes.len() - 1) as u32;
            }
            n = self.nodes[n].child[bit] as usize;
        }
        self.nodes[n].value = Some(value);
    }

    #[inline]
    fn lookup(&self, key: u128, bits: u8) -> Option<T> {
        let mut n = 0usize;
        let mut best = self.nodes[0].value;
        for i in 0..bits {
            let bit = ((key >> (bits - 1 - i)) & 1) as usize;
            let next = self.nodes[n].child[bit];
            if next == NONE {
                break;
            }
            n = next as usize;
            if self.nodes[n].value.is_some() {
                best = self.nodes[n].value;
            }
        }
        best
    }
}

/// A longest-prefix-match table mapping IP prefixes to values (peer ids).
///
/// The last lookup's answer is remembered: a site-to-site link sends most packets to a few
/// hosts, so the common case skips the trie walk. Changes clear the memory.
#[derive(Clone)]
pub struct AllowedIps<T: Copy> {
    v4: Trie<T>,
    v6: Trie<T>,
    last: std::cell::Cell<Option<(IpAddr, Option<T>)>>,
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for AllowedIps<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowedIps").field("v4", &self.v4).field("v6", &self.v6).finish()
    }
}

impl<T: Copy + PartialEq> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + PartialEq> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        AllowedIps { v4: Trie::new(), v6: Trie::new(), last: std::cell::Cell::new(None) }
    }

    /// Maps `net` to `value`, replacing what it mapped to before.
    pub fn insert(&mut self, net: IpNet, value: T) {
        self.last.set(None);
        match net.addr() {
            IpAddr::V4(a) => self.v4.insert(u128::from(u32::from(a)), 32, net.prefix_len(), value),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), 128, net.prefix_len(), value),
        }
    }

    /// The value of the longest prefix containing `ip`.
    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<T> {
        if let Some((last_ip, value)) = self.last.get()
            && last_ip == ip
        {
            return value;
        }
        let value = match ip {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), 128),
        };
        self.last.set(Some((ip, value)));
        value
    }

    /// Empties the table.
    pub fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("::/0"), 10);
        t.insert(net("fd00::/8"), 11);
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(t.lookup(ip("192.168.1.1")), Some(0));
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(1));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(2));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(3));
        assert_eq!(t.lookup(ip("fd12::1")), Some(11));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(10));
        t.insert(net("10.0.0.0/8"), 7);
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(7));
        let empty: AllowedIps<u8> = AllowedIps::new();
        assert_eq!(empty.lookup(ip("10.0.0.1")), None);
    }

    proptest! {
        #[test]
        fn matches_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 1..40),
            probes in proptest::collection::vec(any::<u32>(), 1..50),
        ) {
            let mut t = AllowedIps::new();
            let mut list: Vec<(IpNet, usize)> = Vec::new();
            for (i, (a, l)) in prefixes.iter().enumerate() {
                let n = IpNet::new(IpAddr::from(a.to_be_bytes()), *l).unwrap();
                t.insert(n, i);
                list.retain(|(m, _)| *m != n);
                list.push((n, i));
            }
            for p in probes {
                let ip = IpAddr::from(p.to_be_bytes());
                let want = list.iter().filter(|(n, _)| n.contains(ip)).max_by_key(|(n, _)| n.prefix_len()).map(|(_, v)| *v);
                prop_assert_eq!(t.lookup(ip), want);
            }
        }
    }
}
