//! A hostile network in one UDP socket, for tests: forwards datagrams between two endpoints
//! and, with seeded probabilities, drops, duplicates, reorders, flips bits in, truncates and
//! replays them. Everything from `--a` goes to `--b`; everything else goes to `--a`.
//!
//! `middlebox --listen ADDR --a ADDR --b ADDR [--loss P] [--dup P] [--reorder P] [--flip P]
//!  [--truncate P] [--replay P] [--seed N] [--seconds N]`
//!
//! It stops after `--seconds`. Every second, and at the end, it prints what it has done so
//! far as `key=value` pairs on one line.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;

/// A seeded hostile middlebox.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// One endpoint (datagrams from it go to `b`).
    #[arg(long)]
    a: SocketAddr,
    /// The other endpoint.
    #[arg(long)]
    b: SocketAddr,
    /// Probability of dropping a datagram.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability of sending a datagram twice.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// Probability of holding a datagram back behind the next one.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Probability of flipping one bit.
    #[arg(long, default_value_t = 0.0)]
    flip: f64,
    /// Probability of cutting a datagram short.
    #[arg(long, default_value_t = 0.0)]
    truncate: f64,
    /// Probability of also sending an old recorded datagram.
    #[arg(long, default_value_t = 0.0)]
    replay: f64,
    /// PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run time.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// xorshift64*: plenty for choosing impairments (not for anything secret).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Default, Debug)]
struct Counts {
    forwarded: u64,
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    flipped: u64,
    truncated: u64,
    replayed: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sock = UdpSocket::bind(args.listen)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut rng = Rng(args.seed.max(1) ^ 0x9e37_79b9_7f4a_7c15);
    let mut counts = Counts::default();
    let mut history: VecDeque<(SocketAddr, Vec<u8>)> = VecDeque::with_capacity(256);
    let mut held: Option<(SocketAddr, Vec<u8>)> = None;
    let mut buf = vec![0u8; 65_536];
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut next_report = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        if Instant::now() >= next_report {
            report(&counts);
            next_report += Duration::from_secs(1);
        }
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => {
                // Quiet: let a held datagram go rather than keep it forever.
                if let Some((to, d)) = held.take() {
                    sock.send_to(&d, to)?;
                }
                continue;
            }
        };
        let to = if from == args.a { args.b } else { args.a };
        let mut d = buf[..n].to_vec();
        if history.len() == 256 {
            history.pop_front();
        }
        history.push_back((to, d.clone()));
        if rng.chance(args.loss) {
            counts.dropped += 1;
            continue;
        }
        if rng.chance(args.flip) && !d.is_empty() {
            let bit = rng.below(d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
            counts.flipped += 1;
        }
        if rng.chance(args.truncate) && d.len() > 1 {
            d.truncate(rng.below(d.len()));
            counts.truncated += 1;
        }
        if rng.chance(args.reorder) && held.is_none() {
            held = Some((to, d));
            counts.reordered += 1;
            continue;
        }
        sock.send_to(&d, to)?;
        counts.forwarded += 1;
        if rng.chance(args.dup) {
            sock.send_to(&d, to)?;
            counts.duplicated += 1;
        }
        if let Some((hto, hd)) = held.take() {
            sock.send_to(&hd, hto)?;
        }
        if rng.chance(args.replay) {
            let (rto, old) = &history[rng.below(history.len())];
            sock.send_to(old, *rto)?;
            counts.replayed += 1;
        }
    }
    report(&counts);
    Ok(())
}

fn report(c: &Counts) {
    use std::io::Write;
    println!(
        "forwarded={} dropped={} duplicated={} reordered={} flipped={} truncated={} replayed={}",
        c.forwarded, c.dropped, c.duplicated, c.reordered, c.flipped, c.truncated, c.replayed
    );
    let _ = std::io::stdout().flush();
}
