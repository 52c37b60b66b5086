//! A UDP packet-rate generator and counter for benchmarks (iperf3 tops out near 90,000
//! 64-byte datagrams per second on the machines we measure on; this sends several times that).
//!
//! `udprate send ADDR SECONDS [SIZE] [THREADS]` sends SIZE-byte datagrams (default 64) as fast
//! as it can from THREADS threads (default 1), each with its own socket.
//! `udprate recv ADDR SECONDS` counts what arrives and prints `received_pps=N`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: udprate send ADDR SECONDS [SIZE] [THREADS] | udprate recv ADDR SECONDS";
    let mode = args.get(1).ok_or(usage)?;
    let addr: SocketAddr = args.get(2).ok_or(usage)?.parse()?;
    let secs: u64 = args.get(3).ok_or(usage)?.parse()?;
    match mode.as_str() {
        "send" => {
            let size: usize = args.get(4).map_or(Ok(64), |s| s.parse())?;
            let threads: usize = args.get(5).map_or(Ok(1), |s| s.parse())?;
            let handles: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    std::thread::spawn(move || -> std::io::Result<u64> {
                        let bind: SocketAddr = if addr.is_ipv4() {
                            "0.0.0.0:0".parse().expect("addr")
                        } else {
                            "[::]:0".parse().expect("addr")
                        };
                        let s = UdpSocket::bind(bind)?;
                        s.connect(addr)?;
                        let payload = vec![0x42u8; size];
                        let end = Instant::now() + Duration::from_secs(secs);
                        let mut sent = 0u64;
                        while Instant::now() < end {
                            for _ in 0..256 {
                                if s.send(&payload).is_ok() {
                                    sent += 1;
                                }
                            }
                        }
                        Ok(sent)
                    })
                })
                .collect();
            let mut total = 0;
            for h in handles {
                total += h.join().map_err(|_| "sender thread panicked")??;
            }
            println!("sent_pps={}", total / secs.max(1));
        }
        "recv" => {
            let s = UdpSocket::bind(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut buf = [0u8; 2048];
            let mut count = 0u64;
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                if s.recv(&mut buf).is_ok() {
                    count += 1;
                    last = Instant::now();
                    first.get_or_insert(last);
                }
            }
            let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
            let pps = if span > 0.0 { count as f64 / span } else { 0.0 };
            println!("received_pps={pps:.0} received={count}");
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
