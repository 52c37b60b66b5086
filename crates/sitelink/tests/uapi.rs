//! The UAPI server's request handling against a running (embedded) link: requests of any
//! size, refusals that leave the link untouched, and a connection that stays in step.

use std::io::{BufReader, Cursor};

use sitelink::uapi::{MAX_REQUEST_BYTES, handle_one};
use sitelink::{Link, LinkBuilder, OsRandom, PrivateKey};

fn link() -> Link {
    LinkBuilder::new(PrivateKey::generate(&mut OsRandom))
        .loopback_only(true)
        .start_embedded()
        .expect("link")
        .0
}

/// Hex of a distinct, made-up public key for peer `i`.
fn key_hex(i: u32) -> String {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x42;
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs every request in `input` through `handle_one`, returning the replies in order.
fn serve(link: &Link, input: Vec<u8>) -> Vec<String> {
    let mut reader = BufReader::new(Cursor::new(input));
    let mut out = Vec::new();
    while handle_one(link, &mut reader, &mut out).expect("no I/O error") {}
    String::from_utf8(out).unwrap().split_inclusive("\n\n").map(str::to_owned).collect()
}

#[test]
fn ten_thousand_peers_in_one_request_are_applied() {
    let link = link();
    let mut req = String::from("set=1\n");
    for i in 0..10_000u32 {
        req += &format!(
            "public_key={}\nendpoint=127.0.0.1:{}\nreplace_allowed_ips=true\nallowed_ip=10.{}.{}.{}/32\n",
            key_hex(i),
            1000 + i % 50_000,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        );
    }
    req += "\nget=1\n\n";
    assert!(req.len() > 1 << 20, "the request is over the old 1 MiB limit");
    let replies = serve(&link, req.into_bytes());
    assert_eq!(replies[0], "errno=0\n\n");
    assert_eq!(link.peers().len(), 10_000);
    assert_eq!(replies[1].matches("public_key=").count(), 10_000);
    assert!(replies[1].ends_with("errno=0\n\n"));
}

#[test]
fn a_request_over_the_limit_is_read_to_its_end_refused_and_applies_nothing() {
    let link = link();
    let mut req = format!("set=1\nlisten_port=0\npublic_key={}\n", key_hex(1));
    let line = "allowed_ip=10.0.0.0/8\n";
    while req.len() <= MAX_REQUEST_BYTES + line.len() {
        req += line;
    }
    // The connection stays in step: the next request is answered too.
    req += "\nget=1\n\n";
    let replies = serve(&link, req.into_bytes());
    assert_eq!(replies[0], "errno=-90\n\n", "EMSGSIZE, negated as wg reads it");
    assert!(replies[1].ends_with("errno=0\n\n"));
    assert!(link.peers().is_empty(), "nothing of a refused request is applied");
}

#[test]
fn a_bad_line_refuses_the_whole_request() {
    let link = link();
    let req = format!(
        "set=1\npublic_key={}\nallowed_ip=10.0.0.1/32\npublic_key={}\nallowed_ip=10.0.0.300/32\npublic_key={}\n\nget=1\n\n",
        key_hex(1),
        key_hex(2),
        key_hex(3)
    );
    let replies = serve(&link, req.into_bytes());
    assert_eq!(replies[0], "errno=-22\n\n");
    assert!(link.peers().is_empty(), "the peers before the bad line are not added either");
    assert!(replies[1].ends_with("errno=0\n\n"));
}

#[test]
fn a_taken_listen_port_refuses_the_whole_request() {
    let link = link();
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let req = format!("set=1\nlisten_port={port}\npublic_key={}\n\n", key_hex(1));
    let replies = serve(&link, req.into_bytes());
    assert_eq!(replies[0], "errno=-98\n\n", "EADDRINUSE");
    assert!(link.peers().is_empty());
}
