//! A handshake flood, for tests: what an attacker who knows a device's public key can send.
//! Handshake initiations with a valid mac1 (so they pass the cheap check and would cost
//! Diffie-Hellman work), random bytes, and well-formed transport messages naming no session,
//! from many source ports, as fast as it can, for a while.
//!
//! `flood --target ADDR --public-key BASE64 [--bind IP] [--sockets N] [--seconds N]`
//!
//! Prints `sent=N` when done.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use sitelink::PublicKey;
use sitelink_crypto::cookie::MacSealer;
use sitelink_frame::wire::{INITIATION_LEN, mac_offsets};

/// A handshake flood.
#[derive(Parser, Debug)]
struct Args {
    /// Where to send.
    #[arg(long)]
    target: SocketAddr,
    /// The target's public key (base64), for valid mac1s.
    #[arg(long)]
    public_key: String,
    /// Source address to send from.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Number of source ports.
    #[arg(long, default_value_t = 64)]
    sockets: usize,
    /// Run time.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let key = PublicKey::from_base64(&args.public_key)?;
    let mut sealer = MacSealer::new(&key);
    let sockets: Vec<UdpSocket> =
        (0..args.sockets.max(1)).map(|_| UdpSocket::bind((args.bind, 0))).collect::<Result<_, _>>()?;
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut msg = [0u8; INITIATION_LEN];
    let mut sent = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        for (i, s) in sockets.iter().enumerate() {
            let r = next();
            for chunk in msg[4..].chunks_mut(8) {
                let v = next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
            let len = match r % 8 {
                // Mostly initiations that pass mac1: the expensive kind.
                0..=5 => {
                    msg[..4].copy_from_slice(&[1, 0, 0, 0]);
                    sealer.seal(start, &mut msg, mac_offsets::INITIATION_MAC1);
                    INITIATION_LEN
                }
                // A transport message naming no session.
                6 => {
                    msg[..4].copy_from_slice(&[4, 0, 0, 0]);
                    32 + (i % 100)
                }
                // Noise.
                _ => 1 + (r as usize >> 8) % INITIATION_LEN,
            };
            if s.send_to(&msg[..len], args.target).is_ok() {
                sent += 1;
            }
        }
    }
    println!("sent={sent}");
    Ok(())
}
