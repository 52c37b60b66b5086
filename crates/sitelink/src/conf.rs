//! wg-quick style configuration files: `[Interface]` and `[Peer]` sections of `Key = Value`
//! lines, `#` comments. Errors name the line.
//!
//! Keys that only wg-quick acts on (`Address`, `DNS`, `Table`, `PreUp`, `PostUp`, `PreDown`,
//! `PostDown`, `SaveConfig`) are accepted and kept in [`InterfaceConfig::wg_quick`] for the
//! caller; the link itself uses the rest.

use std::time::Duration;

use crate::parse::{parse_endpoint, resolve_endpoint, shown_key};
use crate::{IpNet, LinkBuilder, PeerConfig, PresharedKey, PrivateKey, PublicKey};

/// A configuration error, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ConfError {
    /// 1-based line number (0 for the file as a whole).
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, Default)]
pub struct InterfaceConfig {
    /// `PrivateKey`.
    pub private_key: Option<PrivateKey>,
    /// `ListenPort`.
    pub listen_port: Option<u16>,
    /// `FwMark` (`off` is 0).
    pub fwmark: Option<u32>,
    /// `MTU`.
    pub mtu: Option<usize>,
    /// The wg-quick-only keys, as `(key, value)` in file order.
    pub wg_quick: Vec<(String, String)>,
}

/// A whole file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The `[Interface]` section.
    pub interface: InterfaceConfig,
    /// The `[Peer]` sections.
    pub peers: Vec<PeerConfig>,
}

impl Config {
    /// A [`LinkBuilder`] for this configuration (needs a private key).
    pub fn into_builder(self) -> Result<LinkBuilder, ConfError> {
        let key = self
            .interface
            .private_key
            .ok_or_else(|| ConfError { line: 0, message: "no PrivateKey in [Interface]".into() })?;
        let mut b = LinkBuilder::new(key);
        if let Some(p) = self.interface.listen_port {
            b = b.listen_port(p);
        }
        if let Some(m) = self.interface.fwmark {
            b = b.fwmark(m);
        }
        if let Some(mtu) = self.interface.mtu {
            b = b.mtu(mtu);
        }
        for p in self.peers {
            b = b.peer(p);
        }
        Ok(b)
    }
}

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Reads a wg-quick style file from disk (endpoint names resolved). Returns the configuration
/// and warnings for the operator: a file holding a private key that group or others may read
/// is one (as `wg` warns).
pub fn load(path: &std::path::Path) -> Result<(Config, Vec<String>), ConfError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |e: std::io::Error| ConfError { line: 0, message: format!("{}: {e}", path.display()) };
    let text = std::fs::read_to_string(path).map_err(io_err)?;
    let mode = std::fs::metadata(path).map_err(io_err)?.permissions().mode();
    let config = parse_resolving(&text)?;
    let mut warnings = Vec::new();
    if config.interface.private_key.is_some() && mode & 0o077 != 0 {
        warnings.push(format!(
            "{} holds a private key and is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok((config, warnings))
}

/// Parses a wg-quick style file whose endpoints are numeric (`ip:port`, `[ipv6]:port`).
pub fn parse(text: &str) -> Result<Config, ConfError> {
    parse_with(text, false)
}

/// Parses a wg-quick style file, resolving endpoint host names through the system resolver.
pub fn parse_resolving(text: &str) -> Result<Config, ConfError> {
    parse_with(text, true)
}

fn parse_with(text: &str, resolve: bool) -> Result<Config, ConfError> {
    let mut config = Config::default();
    let mut section = Section::None;
    let mut peer: Option<PeerConfig> = None;
    let mut seen_interface = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| ConfError { line, message };
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if content.starts_with('[') {
            if let Some(p) = peer.take() {
                config.peers.push(p);
            }
            section = match content.to_ascii_lowercase().as_str() {
                "[interface]" if !seen_interface => {
                    seen_interface = true;
                    Section::Interface
                }
                "[interface]" => return Err(err("a second [Interface] section".into())),
                "[peer]" => Section::Peer,
                other => return Err(err(format!("unknown section {}", shown_key(other)))),
            };
            continue;
        }
        let (key, value) = content.split_once('=').ok_or_else(|| err("expected Key = Value".into()))?;
        let (key, value) = (key.trim(), value.trim());
        let lkey = key.to_ascii_lowercase();
        match section {
            Section::None => return Err(err(format!("{} outside any section", shown_key(key)))),
            Section::Interface => {
                let ifc = &mut config.interface;
                match lkey.as_str() {
                    "privatekey" => {
                        ifc.private_key = Some(
                            PrivateKey::from_base64(value).map_err(|e| err(format!("PrivateKey: {e}")))?,
                        )
                    }
                    "listenport" => {
                        ifc.listen_port =
                            Some(value.parse().map_err(|_| err("ListenPort: not a port".into()))?)
                    }
                    "fwmark" => {
                        ifc.fwmark = Some(if value.eq_ignore_ascii_case("off") {
                            0
                        } else if let Some(hex) = value.strip_prefix("0x") {
                            u32::from_str_radix(hex, 16).map_err(|_| err("FwMark: not a number".into()))?
                        } else {
                            value.parse().map_err(|_| err("FwMark: not a number".into()))?
                        })
                    }
                    "mtu" => {
                        let mtu: usize = value.parse().map_err(|_| err("MTU: not a number".into()))?;
                        if !(576..=65_455).contains(&mtu) {
                            return Err(err(format!("MTU {mtu} outside 576-65455")));
                        }
                        ifc.mtu = Some(mtu);
                    }
                    "address" | "dns" | "table" | "preup" | "postup" | "predown" | "postdown"
                    | "saveconfig" => ifc.wg_quick.push((key.to_owned(), value.to_owned())),
                    _ => return Err(err(format!("unknown [Interface] key {}", shown_key(key)))),
                }
            }
            Section::Peer => {
                let p = peer.get_or_insert_with(|| PeerConfig::new(PublicKey::from_bytes([0; 32])));
                match lkey.as_str() {
                    "publickey" => {
                        p.public_key =
                            PublicKey::from_base64(value).map_err(|e| err(format!("PublicKey: {e}")))?
                    }
                    "presharedkey" => {
                        p.preshared_key = Some(
                            PresharedKey::from_base64(value)
                                .map_err(|e| err(format!("PresharedKey: {e}")))?,
                        )
                    }
                    "endpoint" => {
                        // One endpoint, or several (comma-separated, preferred first): one path
                        // each, watched, with failover.
                        let mut endpoints = Vec::new();
                        for part in value.split(',').map(str::trim) {
                            let ep = if resolve { resolve_endpoint(part) } else { parse_endpoint(part) };
                            endpoints.push(ep.ok_or_else(|| {
                                err(format!(
                                    "Endpoint: not ip:port{} {part:?}",
                                    if resolve { " or resolvable" } else { "" }
                                ))
                            })?);
                        }
                        p.endpoint = endpoints.first().copied();
                        p.fallback_endpoints = endpoints.split_off(1);
                    }
                    "probepaths" => {
                        p.probe_paths = match value.to_ascii_lowercase().as_str() {
                            "true" | "on" | "yes" => true,
                            "false" | "off" | "no" => false,
                            _ => return Err(err("ProbePaths: true or false".into())),
                        }
                    }
                    "allowedips" => {
                        for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let net: IpNet = part.parse().map_err(|e| err(format!("AllowedIPs: {e}")))?;
                            p.allowed_ips.push(net);
                        }
                    }
                    "persistentkeepalive" => {
                        let secs: u16 = if value.eq_ignore_ascii_case("off") {
                            0
                        } else {
                            value.parse().map_err(|_| err("PersistentKeepalive: 0-65535 or off".into()))?
                        };
                        p.persistent_keepalive = (secs > 0).then(|| Duration::from_secs(secs.into()));
                    }
                    _ => return Err(err(format!("unknown [Peer] key {}", shown_key(key)))),
                }
            }
        }
    }
    if let Some(p) = peer.take() {
        config.peers.push(p);
    }
    for p in &config.peers {
        if *p.public_key.as_bytes() == [0; 32] {
            return Err(ConfError { line: 0, message: "a [Peer] without PublicKey".into() });
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn reads_a_wg_quick_file() {
        let text = format!(
            "# site A\n[Interface]\nPrivateKey = {KEY}\nListenPort = 51820\nAddress = 10.0.0.1/24\n\
             MTU = 1420\nFwMark = 0x10\n\n[Peer]\nPublicKey = {PUB}\nAllowedIPs = 10.0.0.2/32, fd00::/64\n\
             Endpoint = 127.0.0.1:51821\nPersistentKeepalive = 25 # NAT\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.fwmark, Some(16));
        assert_eq!(c.interface.mtu, Some(1420));
        assert_eq!(c.interface.wg_quick, vec![("Address".into(), "10.0.0.1/24".into())]);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].persistent_keepalive, Some(Duration::from_secs(25)));
        assert!(c.into_builder().is_ok());
    }

    #[test]
    fn several_endpoints_make_paths_preferred_first() {
        let text = format!(
            "[Peer]\nPublicKey = {PUB}\nEndpoint = 192.0.2.1:51820, [2001:db8::1]:51820 ,198.51.100.7:4500\n\
             ProbePaths = off\n"
        );
        let c = parse(&text).unwrap();
        let p = &c.peers[0];
        assert_eq!(p.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(
            p.fallback_endpoints,
            ["[2001:db8::1]:51820".parse().unwrap(), "198.51.100.7:4500".parse().unwrap()]
        );
        assert!(!p.probe_paths);
        let one = parse(&format!("[Peer]\nPublicKey = {PUB}\nEndpoint = 192.0.2.1:51820\n")).unwrap();
        assert!(one.peers[0].fallback_endpoints.is_empty() && one.peers[0].probe_paths);
        let bad = parse(&format!("[Peer]\nPublicKey = {PUB}\nEndpoint = 192.0.2.1:51820, nowhere\n"));
        assert!(bad.unwrap_err().to_string().contains("\"nowhere\""));
        assert!(parse(&format!("[Peer]\nPublicKey = {PUB}\nProbePaths = maybe\n")).is_err());
    }

    #[test]
    fn a_key_file_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("sitelink-conf-test-{}.conf", std::process::id()));
        std::fs::write(&path, format!("[Interface]\nPrivateKey = {KEY}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, warnings) = load(&path).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("644"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (config, warnings) = load(&path).unwrap();
        assert!(warnings.is_empty());
        assert!(config.interface.private_key.is_some());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(load(&path).unwrap_err().line, 0);
    }

    #[test]
    fn malformed_key_lines_do_not_echo_the_key() {
        let psk = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";
        for text in [
            format!("[Interface]\nPrivateKey {KEY}\n"),
            format!("[Interface]\nPrivateKey: {KEY}\n"),
            format!("[Interface]\n{KEY}\n"),
            format!("[Interface]\nPrivateKey = {}\n", &KEY[..40]),
            format!("[Interface]\nPrivateKey = {KEY}x\n"),
            format!("[Peer]\nPublicKey = {PUB}\nPresharedKey {psk}\n"),
            format!("[Peer]\nPublicKey = {PUB}\nPresharedKey = {psk}psk\n"),
            format!("{KEY}\n"),
            format!("[{KEY}]\n"),
        ] {
            let e = parse(&text).unwrap_err();
            let shown = e.to_string();
            for secret in [KEY, &KEY[..40], &KEY[..20], psk, &psk[..20]] {
                assert!(!shown.contains(secret), "{text:?} gave {shown:?}");
            }
            assert!(e.line >= 1, "{text:?}: the error names the line: {shown}");
        }
    }

    #[test]
    fn no_key_shows_in_debug_output() {
        let text = format!(
            "[Interface]\nPrivateKey = {KEY}\n[Peer]\nPublicKey = {PUB}\nPresharedKey = {KEY}\nAllowedIPs = 10.0.0.2/32\n"
        );
        let config = parse(&text).unwrap();
        let key = PrivateKey::from_base64(KEY).unwrap();
        let builder = config.clone().into_builder().unwrap();
        for shown in [format!("{config:?}"), format!("{builder:?}"), format!("{:?}", config.peers)] {
            assert!(!shown.contains(KEY), "base64 key in {shown}");
            assert!(!shown.contains(&key.to_hex()), "hex key in {shown}");
            assert!(!shown.contains(&format!("{:?}", key.as_bytes())), "key bytes in {shown}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line) in [
            ("[Interface]\nPrivateKey = nope\n".to_owned(), 2),
            ("ListenPort = 1\n".to_owned(), 1),
            (
                format!(
                    "[Interface]\nPrivateKey = {KEY}\n[Peer]\nPublicKey = {PUB}\nAllowedIPs = 10.0.0.0/40\n"
                ),
                5,
            ),
            ("[Interface]\nBogus = 1\n".to_owned(), 2),
            ("[Interface]\n[Interface]\n".to_owned(), 2),
            ("[Nonsense]\n".to_owned(), 1),
            ("[Interface]\njunk\n".to_owned(), 2),
        ] {
            assert_eq!(parse(&text).unwrap_err().line, line, "{text}");
        }
        assert!(parse("[Peer]\nAllowedIPs = 10.0.0.0/8\n").is_err());
    }
}
