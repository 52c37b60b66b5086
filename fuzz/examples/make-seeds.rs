//! Writes the seed corpora: valid inputs for every target, into fuzz/corpus/TARGET/.
use std::fs;
use std::path::Path;

use sitelink_frame::wire::MessageType;
use sitelink_fuzz::Scene;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let scene = Scene::new(true);
    for (i, (_, msg)) in scene.recorded.iter().enumerate() {
        write("parse_messages", &format!("recorded-{i}"), msg);
        let mut raw = vec![0u8];
        raw.extend_from_slice(msg);
        write("decapsulate", &format!("raw-{i}"), &raw);
    }
    write("decapsulate", "xor-zero", &[1, 0, 0, 0, 0]);
    write("decapsulate", "payload", &[2, 1, 2, 3, 4]);
    if let Some(init) = scene.first(MessageType::HandshakeInitiation) {
        let mut m = vec![0u8];
        m.extend_from_slice(&init);
        write("handshake_initiation", "raw", &m);
        write("handshake_initiation", "xor-zero", &[1]);
        write("handshake_initiation", "zeros", &[2; 1]);
    }
    if let Some(resp) = scene.first(MessageType::HandshakeResponse) {
        let mut m = vec![0u8];
        m.extend_from_slice(&resp);
        write("handshake_response", "raw", &m);
        let mut f = vec![1u8];
        f.extend_from_slice(&resp);
        write("handshake_response", "framed", &f);
    }
    // device_ops scripts: data both ways, simultaneous rekeys with time between, a removal,
    // then replays of the first datagrams on record (old indices).
    let mut script = vec![0u8, 0, 4, 1, 4, 6, 6];
    for _ in 0..3 {
        script.extend_from_slice(&[4, 0, 6, 6, 0, 2, 1, 2, 5, 50]);
    }
    script.extend_from_slice(&[7, 0, 9, 0, 0, 0, 9, 3, 0, 0, 10, 4, 20, 1, 8, 0, 0, 9]);
    write("device_ops", "rekeys-removal-replays", &script);
    write("device_ops", "cookie-mode", &[1, 4, 0, 4, 0, 4, 0, 4, 0, 5, 200, 0, 9, 6, 200, 6, 200]);
    write("cookie_reply", "zeros", &[0u8; 64]);
    write("ip_peek", "v4", &[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
    v6.extend_from_slice(&[0xfd; 32]);
    write("ip_peek", "v6", &v6);
    // A TCP/IPv4 super-packet of 3,000 payload bytes under a TSO header (gso_size 1,000).
    let hdr = sitelink_frame::offload::VirtioNetHdr {
        flags: 1,
        gso_type: sitelink_frame::offload::VirtioNetHdr::GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1000,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut tso = vec![0u8; 10];
    hdr.write(&mut tso).expect("10 bytes");
    let mut tcp = vec![0u8; 20 + 3000];
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    let mut ip = vec![0u8; 20 + tcp.len()];
    let n = sitelink_frame::ip::build_ipv4(&mut ip, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 6, &tcp)
        .expect("fits");
    tso.extend_from_slice(&ip[..n]);
    write("offload_segment", "tso-v4", &tso);
    let k = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    write(
        "uapi_set",
        "full",
        format!(
            "private_key={k}\nlisten_port=51820\nreplace_peers=true\npublic_key={k}\nendpoint=127.0.0.1:1\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/24\n\n"
        )
        .as_bytes(),
    );
    write(
        "conf_parse",
        "full",
        b"[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nListenPort = 51820\n\n[Peer]\n\
          PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs = 10.0.0.2/32, fd00::/64\n\
          Endpoint = 127.0.0.1:51821\nPersistentKeepalive = 25\n",
    );
}
