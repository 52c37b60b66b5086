//! The WireGuard userspace control interface (UAPI) that `wg` and `wg-quick` speak over
//! `/var/run/wireguard/IFNAME.sock`.
//!
//! [`parse_set`] turns a `set=1` request into a [`SetRequest`] without touching the link, so
//! that malformed input is rejected before anything changes (and so the parser can be fuzzed);
//! [`apply_set`] applies it; [`format_get`] answers `get=1`. [`serve`] runs the socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::change::{PeerChange, SetRequest};
use crate::parse::shown_key;
pub use crate::parse::{parse_endpoint, resolve_endpoint};
use crate::{IpNet, Link, LinkError, PresharedKey, PrivateKey, PublicKey};

/// The most bytes one `set=1` request may carry: 16 MiB, some 150,000 peers with an endpoint
/// and an allowed IP each. A request is parsed line by line as it arrives, so this bounds the
/// parsed request, not a copy of its text. A longer request is read to its end (so that `wg`,
/// which writes it all before it reads the answer, is not cut off mid-write) and answered
/// with `errno=-EMSGSIZE`, and the refusal is logged; nothing of it is applied.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// A UAPI failure, answered as `errno=N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UapiError {
    /// A line was not `key=value`, named an unknown key, or had a bad value (EINVAL).
    #[error("line {line}: {message}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// The request was neither `get=1` nor `set=1`, or ended early (EPROTO).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The listen port is taken (EADDRINUSE).
    #[error("listen port in use")]
    PortInUse,
    /// Applying the request failed in the link (EIO).
    #[error("{0}")]
    Apply(String),
    /// The request was longer than [`MAX_REQUEST_BYTES`] (EMSGSIZE).
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
}

impl UapiError {
    /// The errno value this failure stands for (positive; the reply carries it negated).
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Invalid { .. } => libc_errno::EINVAL,
            UapiError::Protocol(_) => libc_errno::EPROTO,
            UapiError::PortInUse => libc_errno::EADDRINUSE,
            UapiError::Apply(_) => libc_errno::EIO,
            UapiError::TooLarge => libc_errno::EMSGSIZE,
        }
    }
}

/// The errno values the UAPI answers with (Linux numbering, as `wg` expects).
mod libc_errno {
    pub(super) const EIO: i32 = 5;
    pub(super) const EINVAL: i32 = 22;
    pub(super) const EPROTO: i32 = 71;
    pub(super) const EMSGSIZE: i32 = 90;
    pub(super) const EADDRINUSE: i32 = 98;
}

fn invalid(line: usize, message: impl Into<String>) -> UapiError {
    UapiError::Invalid { line, message: message.into() }
}

/// Parses the body of a `set=1` request (the lines after `set=1`, up to the empty line).
pub fn parse_set(body: &str) -> Result<SetRequest, UapiError> {
    let mut parser = SetParser::default();
    for (i, raw) in body.lines().enumerate() {
        if raw.is_empty() {
            break;
        }
        parser.line(i + 1, raw)?;
    }
    Ok(parser.finish())
}

/// A `set=1` request parsed line by line, as it arrives: nothing but the parsed request is
/// kept, whatever its size.
#[derive(Debug, Default)]
pub struct SetParser {
    req: SetRequest,
}

impl SetParser {
    /// Takes line `line` (1-based, without its newline).
    pub fn line(&mut self, line: usize, raw: &str) -> Result<(), UapiError> {
        let req = &mut self.req;
        let (key, value) = raw.split_once('=').ok_or_else(|| invalid(line, "expected key=value"))?;
        let flag = |v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(invalid(line, format!("{key} must be true or false"))),
        };
        let device_level = req.peers.is_empty();
        match key {
            "private_key" if device_level => {
                req.private_key = Some(
                    PrivateKey::from_hex(value).map_err(|e| invalid(line, format!("private_key: {e}")))?,
                );
            }
            "listen_port" if device_level => {
                req.listen_port = Some(value.parse().map_err(|_| invalid(line, "listen_port: not a port"))?);
            }
            "fwmark" if device_level => {
                req.fwmark = Some(value.parse().map_err(|_| invalid(line, "fwmark: not a number"))?);
            }
            "replace_peers" if device_level => req.replace_peers = flag(value)?,
            "public_key" => {
                let public_key =
                    PublicKey::from_hex(value).map_err(|e| invalid(line, format!("public_key: {e}")))?;
                req.peers.push(PeerChange {
                    public_key,
                    remove: false,
                    update_only: false,
                    preshared_key: None,
                    endpoint: None,
                    persistent_keepalive: None,
                    replace_allowed_ips: false,
                    allowed_ips: Vec::new(),
                    removed_allowed_ips: Vec::new(),
                });
            }
            _ => {
                let unexpected = || invalid(line, format!("unexpected key {} here", shown_key(key)));
                let p = req.peers.last_mut().ok_or_else(unexpected)?;
                parse_peer_line(p, key, value, line, flag)?;
            }
        }
        Ok(())
    }

    /// The request.
    pub fn finish(self) -> SetRequest {
        self.req
    }
}

fn parse_peer_line(
    p: &mut PeerChange,
    key: &str,
    value: &str,
    line: usize,
    flag: impl Fn(&str) -> Result<bool, UapiError>,
) -> Result<(), UapiError> {
    match key {
        "remove" => p.remove = flag(value)?,
        "update_only" => p.update_only = flag(value)?,
        "preshared_key" => {
            p.preshared_key = Some(
                PresharedKey::from_hex(value).map_err(|e| invalid(line, format!("preshared_key: {e}")))?,
            );
        }
        "endpoint" => {
            p.endpoint = Some(parse_endpoint(value).ok_or_else(|| invalid(line, "endpoint: not ip:port"))?);
        }
        "persistent_keepalive_interval" => {
            p.persistent_keepalive =
                Some(value.parse().map_err(|_| invalid(line, "persistent_keepalive_interval: 0-65535"))?);
        }
        "replace_allowed_ips" => {
            p.replace_allowed_ips = flag(value)?;
            if p.replace_allowed_ips {
                p.allowed_ips.clear();
                p.removed_allowed_ips.clear();
            }
        }
        "allowed_ip" => {
            let (remove, prefix) = match value.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, value),
            };
            let net: IpNet = prefix.parse().map_err(|e| invalid(line, format!("allowed_ip: {e}")))?;
            if remove {
                p.allowed_ips.retain(|n| *n != net);
                p.removed_allowed_ips.push(net);
            } else {
                p.removed_allowed_ips.retain(|n| *n != net);
                p.allowed_ips.push(net);
            }
        }
        "protocol_version" => {
            if value != "1" {
                return Err(invalid(line, "protocol_version: only 1 is known"));
            }
        }
        _ => return Err(invalid(line, format!("unexpected key {} here", shown_key(key)))),
    }
    Ok(())
}

/// Applies a parsed request to `link`, in order ([`Link::apply`]), with the errno `wg` expects
/// for each failure.
pub fn apply_set(link: &Link, req: SetRequest) -> Result<(), UapiError> {
    link.apply(req).map_err(|e| match e {
        LinkError::Io { source, .. } if source.kind() == io::ErrorKind::AddrInUse => UapiError::PortInUse,
        other => UapiError::Apply(other.to_string()),
    })
}

/// The reply to `get=1` (without the closing `errno=0` and empty line).
pub fn format_get(link: &Link) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(1024);
    let port = link.port();
    let mark = link.fwmark();
    if let Some(key) = link.private_key() {
        let _ = writeln!(s, "private_key={}", key.to_hex());
    }
    let _ = writeln!(s, "listen_port={port}");
    if mark != 0 {
        let _ = writeln!(s, "fwmark={mark}");
    }
    for p in link.peers() {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", psk.to_hex());
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let hs = p.stats.last_handshake.unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", hs.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", hs.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.stats.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.stats.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.map_or(0, |d| d.as_secs())
        );
        for net in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s
}

/// Reads one request from `reader` and answers it on `writer`. Returns `Ok(false)` at the end
/// of the stream. Malformed requests get an errno reply; nothing here panics on input.
pub fn handle_one(link: &Link, reader: &mut impl BufRead, writer: &mut impl Write) -> io::Result<bool> {
    let mut first = String::new();
    if read_line_bounded(reader, &mut first)? == 0 {
        return Ok(false);
    }
    match first.trim_end_matches('\n') {
        "get=1" => {
            // The request ends with an empty line.
            let mut rest = String::new();
            while read_line_bounded(reader, &mut rest)? > 0 && rest != "\n" {
                rest.clear();
            }
            let mut reply = format_get(link);
            reply.push_str("errno=0\n\n");
            writer.write_all(reply.as_bytes())?;
        }
        "set=1" => {
            // Parsed as it arrives. After the first error (or past the size limit) the rest
            // is read and dropped, so that the client, which writes the whole request before
            // it reads, gets its answer rather than a broken pipe.
            let mut parser = SetParser::default();
            let mut failed: Option<UapiError> = None;
            let mut line = String::new();
            let (mut number, mut bytes, mut complete) = (0, 0, false);
            loop {
                line.clear();
                match read_line_bounded(reader, &mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        // A line of over 64 KiB is no UAPI line: answer, then hang up.
                        tracing::warn!("UAPI set refused: a line longer than 64 KiB");
                        return reply_errno(writer, &UapiError::TooLarge).map(|_| false);
                    }
                    Err(e) => return Err(e),
                }
                if line == "\n" {
                    complete = true;
                    break;
                }
                number += 1;
                bytes += line.len();
                if failed.is_some() {
                    continue;
                }
                if bytes > MAX_REQUEST_BYTES {
                    failed = Some(UapiError::TooLarge);
                } else if let Err(e) = parser.line(number, line.trim_end_matches('\n')) {
                    failed = Some(e);
                }
            }
            let result = match (failed, complete) {
                (Some(e), _) => Err(e),
                (None, false) => Err(UapiError::Protocol("request ended before its empty line".into())),
                (None, true) => apply_set(link, parser.finish()),
            };
            match result {
                Ok(()) => writer.write_all(b"errno=0\n\n")?,
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI set refused");
                    reply_errno(writer, &e)?;
                }
            }
        }
        other => {
            let e = UapiError::Protocol(format!(
                "unknown operation {:?}",
                other.chars().take(32).collect::<String>()
            ));
            tracing::warn!(error = %e, "UAPI request refused");
            reply_errno(writer, &e)?;
            return Ok(false);
        }
    }
    writer.flush()?;
    Ok(true)
}

/// Answers a failure as wireguard-go does, with the errno negated (`errno=-22`): `wg` takes
/// the number as a negative error code and prints the matching message.
fn reply_errno(writer: &mut impl Write, e: &UapiError) -> io::Result<()> {
    writer.write_all(format!("errno=-{}\n\n", e.errno()).as_bytes())?;
    writer.flush()
}

/// Reads a line of at most 64 KiB (longer lines are an error, not a memory sink).
fn read_line_bounded<R: BufRead>(reader: &mut R, out: &mut String) -> io::Result<usize> {
    let mut limited = io::Read::take(&mut *reader, 64 * 1024);
    let n = limited.read_line(out)?;
    if n > 0 && !out.ends_with('\n') && n == 64 * 1024 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "UAPI line too long"));
    }
    Ok(n)
}

/// The socket path `wg` looks for: `/var/run/wireguard/IFNAME.sock`.
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{ifname}.sock"))
}

/// Creates the UAPI socket at `path` (and its directory), replacing a stale one. The socket is
/// mode 0600 whatever the process umask, since `get=1` answers with the private key: it is
/// bound under a temporary name, restricted, and only then renamed into place, so no one can
/// connect while it is still open to them.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    remove_if_present(&temp)?;
    let listener = UnixListener::bind(&temp)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Serves UAPI connections from `listener` until `link` stops, one thread per connection.
pub fn serve(link: Arc<Link>, listener: UnixListener) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sitelink-uapi".into()).spawn(move || {
        for conn in listener.incoming() {
            if link.is_stopped() {
                break;
            }
            match conn {
                Ok(stream) => {
                    let link = Arc::clone(&link);
                    let _ = std::thread::Builder::new()
                        .name("sitelink-uapi-conn".into())
                        .spawn(move || serve_connection(&link, stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })
}

fn serve_connection(link: &Link, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut writer = io::BufWriter::new(write_half);
    while let Ok(true) = handle_one(link, &mut reader, &mut writer) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";

    #[test]
    fn parses_a_full_set() {
        let body = format!(
            "private_key={K1}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\npublic_key={K1}\n\
             preshared_key={K1}\nendpoint=[::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nprotocol_version=1\n\n"
        );
        let req = parse_set(&body).unwrap();
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(7));
        assert!(req.replace_peers && req.private_key.is_some());
        let p = &req.peers[0];
        assert_eq!(p.endpoint, Some("[::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        for (body, line) in [
            ("listen_port=x\n", 1),
            (&format!("public_key={K1}\nendpoint=nonsense\n") as &str, 2),
            ("endpoint=1.2.3.4:5\n", 1),
            ("nokey\n", 1),
            (&format!("public_key={K1}\nallowed_ip=10.0.0.0/99\n"), 2),
            (&format!("public_key={K1}\nprotocol_version=2\n"), 2),
            ("private_key=abcd\n", 1),
            (&format!("public_key={K1}\nlisten_port=1\n"), 2),
        ] {
            match parse_set(body) {
                Err(UapiError::Invalid { line: l, .. }) => assert_eq!(l, line, "{body:?}"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        assert_eq!(parse_set("x\n").unwrap_err().errno(), 22);
    }

    #[test]
    fn errno_replies_are_negative_as_wg_expects() {
        // wg-tools reads `errno=` as a signed number and reports -N as error N; a positive
        // number made it print "Success" or a wrong message.
        let mut out = Vec::new();
        reply_errno(&mut out, &UapiError::PortInUse).unwrap();
        assert_eq!(out, b"errno=-98\n\n");
    }

    #[test]
    fn allowed_ip_removal_lines_parse_in_order() {
        let body = format!(
            "public_key={K1}\nallowed_ip=10.0.0.0/24\nallowed_ip=-10.0.0.0/24\nallowed_ip=-10.1.0.0/16\n\
             allowed_ip=fd00::/64\nallowed_ip=-fd00::/64\nallowed_ip=fd00::/64\n\n"
        );
        let p = &parse_set(&body).unwrap().peers[0];
        assert_eq!(p.allowed_ips, vec!["fd00::/64".parse::<IpNet>().unwrap()]);
        assert_eq!(
            p.removed_allowed_ips,
            vec!["10.0.0.0/24".parse().unwrap(), "10.1.0.0/16".parse().unwrap()]
        );
        assert!(parse_set(&format!("public_key={K1}\nallowed_ip=-x\n")).is_err());
    }

    #[test]
    fn key_material_in_a_bad_line_is_not_echoed() {
        let body = format!("private_key{K1}=\n");
        let e = parse_set(&body).unwrap_err().to_string();
        assert!(!e.contains(&K1[..16]), "{e}");
    }

    #[test]
    fn the_socket_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sitelink-uapi-test-{}", std::process::id()));
        let path = dir.join("wgtest0.sock");
        // The umask is process-wide and other tests run beside this one, so it is left as
        // it is: under the usual 022 a plain bind leaves the socket 0755, which shows here.
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode {mode:o}");
        // A stale socket is replaced.
        drop(_listener);
        let _again = bind(&path).unwrap();
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
