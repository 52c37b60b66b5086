//! Integration as root: two network namespaces joined by a veth pair, sitelinkd in one and
//! sitelinkd, wireguard-go or boringtun in the other, configured with the stock `wg` tool.
//! Each test pings across the tunnel, moves a TCP stream whose content is checked end to end,
//! and reads the `wg show` counters.
//!
//! Without root or the peer programs these tests say so loudly and pass; with `CI=true` they
//! must run and fail instead. Namespaces, interfaces and processes are removed by a guard,
//! even when a test fails. Addresses exist only inside the namespaces made here.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SITELINKD: &str = env!("CARGO_BIN_EXE_sitelinkd");

#[derive(Clone, Copy, Debug, PartialEq)]
enum Impl {
    Sitelink(&'static str),
    WireguardGo,
    Boringtun,
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the test can run here; explains loudly when not (and fails under CI).
fn can_run(needs: &[&str]) -> bool {
    let mut missing: Vec<String> = needs.iter().filter(|p| !have(p)).map(|p| (*p).to_owned()).collect();
    if !sitelink_io::is_root() {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("netns test cannot run: missing {}", missing.join(", "));
    if in_ci() {
        panic!("{msg} (CI=true: netns tests may not skip)");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    false
}

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn must(cmd: &str) -> String {
    let (ok, text) = sh(cmd);
    assert!(ok, "`{cmd}` failed: {text}");
    text
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, a veth pair between them and one WireGuard implementation in each.
/// Everything is torn down on drop.
struct Pair {
    ns: [String; 2],
    ifname: [String; 2],
    procs: Vec<Child>,
}

impl Pair {
    fn new() -> Pair {
        let id = format!("{}{}", std::process::id() % 10_000, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let pair = Pair {
            ns: [format!("slA{id}"), format!("slB{id}")],
            ifname: [format!("sla{id}"), format!("slb{id}")],
            procs: Vec::new(),
        };
        let [a, b] = &pair.ns;
        must(&format!("ip netns add {a} && ip netns add {b}"));
        must(&format!("ip link add va{id} type veth peer name vb{id}"));
        must(&format!("ip link set va{id} netns {a} && ip link set vb{id} netns {b}"));
        must(&format!(
            "ip -n {a} addr add 10.201.0.1/24 dev va{id} && ip -n {b} addr add 10.201.0.2/24 dev vb{id}"
        ));
        for (n, v) in [(a, format!("va{id}")), (b, format!("vb{id}"))] {
            must(&format!("ip -n {n} link set lo up && ip -n {n} link set {v} up"));
        }
        pair
    }

    fn socket(&self, side: usize) -> String {
        format!("/var/run/wireguard/{}.sock", self.ifname[side])
    }

    fn start(&mut self, side: usize, imp: Impl) {
        let (ns, ifname) = (&self.ns[side], &self.ifname[side]);
        let log = std::fs::File::create(format!("/tmp/netns-test-{ifname}.log")).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        match imp {
            Impl::Sitelink(backend) => {
                cmd.args([SITELINKD, "-f", "--backend", backend, ifname]).env("LOG_LEVEL", "debug");
            }
            Impl::WireguardGo => {
                cmd.args(["wireguard-go", "-f", ifname]).env("WG_PROCESS_FOREGROUND", "1");
            }
            Impl::Boringtun => {
                cmd.args(["boringtun-cli", "-f", "--disable-drop-privileges", "-t", "1", ifname])
                    .env("WG_SUDO", "1");
            }
        }
        let child =
            cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("start implementation");
        self.procs.push(child);
        let start = Instant::now();
        while !std::path::Path::new(&self.socket(side)).exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "{imp:?} did not open {}", self.socket(side));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ns_exec(&self, side: usize, cmd: &str) -> String {
        must(&format!("ip netns exec {} {cmd}", self.ns[side]))
    }

    /// Keys, ports, peers and addresses: tunnel 10.202.0.1 <-> 10.202.0.2.
    fn configure(&self) {
        let keys: Vec<String> = (0..2).map(|_| must("wg genkey").trim().to_owned()).collect();
        let pubs: Vec<String> =
            keys.iter().map(|k| must(&format!("echo {k} | wg pubkey")).trim().to_owned()).collect();
        for (side, key) in keys.iter().enumerate() {
            let other = 1 - side;
            let keyfile = format!("/tmp/netns-test-{}.key", self.ifname[side]);
            std::fs::write(&keyfile, key).expect("key file");
            self.ns_exec(
                side,
                &format!(
                    "wg set {} private-key {keyfile} listen-port 51820 peer {} allowed-ips 10.202.0.{}/32 endpoint 10.201.0.{}:51820",
                    self.ifname[side],
                    pubs[other],
                    other + 1,
                    other + 1
                ),
            );
            let _ = std::fs::remove_file(&keyfile);
            self.ns_exec(side, &format!("ip addr add 10.202.0.{}/24 dev {}", side + 1, self.ifname[side]));
            self.ns_exec(side, &format!("ip link set {} mtu 1420 up", self.ifname[side]));
        }
    }

    /// Counters from `wg show IFNAME transfer` on `side`: (rx, tx).
    fn transfer(&self, side: usize) -> (u64, u64) {
        let out = self.ns_exec(side, &format!("wg show {} transfer", self.ifname[side]));
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.len(), 3, "wg show transfer: {out}");
        (f[1].parse().expect("rx"), f[2].parse().expect("tx"))
    }

    fn latest_handshake(&self, side: usize) -> u64 {
        let out = self.ns_exec(side, &format!("wg show {} latest-handshakes", self.ifname[side]));
        out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Sends `bytes` of a deterministic stream over TCP from `from` to the other side and
    /// checks that the receiver got exactly it (length and SHA-256).
    fn tcp_transfer_checked(&self, from: usize, bytes: usize) {
        let to = 1 - from;
        let port = 5201 + from;
        let server = format!(
            "ip netns exec {} python3 -c 'import socket,hashlib\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((\"10.202.0.{}\", {port})); s.listen(1); s.settimeout(20)\n\
             c,_=s.accept(); c.settimeout(20); h=hashlib.sha256(); n=0\n\
             while True:\n  d=c.recv(1<<16)\n  if not d: break\n  h.update(d); n+=len(d)\n\
             print(n, h.hexdigest())'",
            self.ns[to],
            to + 1
        );
        let srv = Command::new("sh").arg("-c").arg(server).stdout(Stdio::piped()).spawn().expect("server");
        std::thread::sleep(Duration::from_millis(300));
        let client = format!(
            "ip netns exec {} python3 -c 'import socket,hashlib,time\n\
             block=bytes((i*7+3)%251 for i in range(65536)); total={bytes}; h=hashlib.sha256(); sent=0\n\
             for t in range(50):\n  try:\n    s=socket.create_connection((\"10.202.0.{}\", {port}), timeout=20); break\n  except OSError: time.sleep(0.1)\n\
             while sent<total:\n  b=block[:min(len(block), total-sent)]; s.sendall(b); h.update(b); sent+=len(b)\n\
             s.close(); print(sent, h.hexdigest())'",
            self.ns[from],
            to + 1
        );
        let sent = must(&client);
        let out = srv.wait_with_output().expect("server output");
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(got.trim(), sent.trim(), "TCP stream content differs: sent {sent:?}, received {got:?}");
        assert!(sent.starts_with(&bytes.to_string()), "sent {sent}");
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for p in &mut self.procs {
            // SIGTERM first so implementations remove their sockets; then make sure.
            let _ = Command::new("kill").arg(p.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in &mut self.procs {
            while Instant::now() < deadline && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.ns {
            let _ = sh(&format!("ip netns del {ns}"));
        }
        for side in 0..2 {
            let _ = std::fs::remove_file(self.socket(side));
        }
    }
}

fn needs(imp: Impl) -> Vec<&'static str> {
    let mut n = vec!["ip", "wg", "python3"];
    match imp {
        Impl::WireguardGo => n.push("wireguard-go"),
        Impl::Boringtun => n.push("boringtun-cli"),
        Impl::Sitelink(_) => {}
    }
    n
}

/// sitelinkd (backend `backend`) on side A, `peer` on side B; `initiator` sends first.
fn link_test(backend: &'static str, peer: Impl, initiator: usize) {
    if !can_run(&needs(peer)) {
        return;
    }
    let mut pair = Pair::new();
    pair.start(0, Impl::Sitelink(backend));
    pair.start(1, peer);
    pair.configure();
    let other = 1 - initiator;
    pair.ns_exec(initiator, &format!("ping -c 3 -i 0.2 -W 3 10.202.0.{}", other + 1));
    pair.ns_exec(other, &format!("ping -c 2 -i 0.2 -W 3 10.202.0.{}", initiator + 1));
    pair.tcp_transfer_checked(initiator, 4 << 20);
    pair.tcp_transfer_checked(other, 1 << 20);
    for side in 0..2 {
        let (rx, tx) = pair.transfer(side);
        assert!(rx > 1 << 20 && tx > 1 << 20, "side {side} counters rx {rx} tx {tx}");
    }
    // Our side reports the handshake as wall-clock time, as `wg` expects (boringtun 0.7
    // reports the time since the handshake instead, so the peer's is not checked).
    assert!(pair.latest_handshake(0) > 1_600_000_000, "sitelinkd shows no handshake");
    // A receiver cannot count more than its peer sent (it may count less: a fast sender can
    // overrun a slower peer's socket buffer, and TCP then resends). boringtun counts its bytes
    // without WireGuard's header and tag, so only peers that count whole messages compare.
    if peer != Impl::Boringtun {
        let (a, b) = (pair.transfer(0), pair.transfer(1));
        assert!(b.0 <= a.1 + 4096 && a.0 <= b.1 + 4096, "A (rx, tx) {a:?} B {b:?}");
    }
}

#[test]
fn sitelink_with_sitelink_mmsg() {
    link_test("mmsg", Impl::Sitelink("mmsg"), 0);
}

#[test]
fn sitelink_with_sitelink_uring() {
    link_test("uring", Impl::Sitelink("uring"), 1);
}

#[test]
fn sitelink_initiates_to_wireguard_go() {
    link_test("mmsg", Impl::WireguardGo, 0);
}

#[test]
fn wireguard_go_initiates_to_sitelink() {
    link_test("uring", Impl::WireguardGo, 1);
}

#[test]
fn sitelink_initiates_to_boringtun() {
    link_test("uring", Impl::Boringtun, 0);
}

#[test]
fn boringtun_initiates_to_sitelink() {
    link_test("mmsg", Impl::Boringtun, 1);
}

/// Garbage at the port is counted and dropped; the link keeps forwarding.
#[test]
fn sitelinkd_survives_garbage_and_counts_it() {
    if !can_run(&needs(Impl::Sitelink("mmsg"))) {
        return;
    }
    let mut pair = Pair::new();
    pair.start(0, Impl::Sitelink("mmsg"));
    pair.start(1, Impl::Sitelink("mmsg"));
    pair.configure();
    pair.ns_exec(0, "ping -c 2 -i 0.2 -W 3 10.202.0.2");
    // Random bytes, truncated and oversized messages, a transport header naming no session.
    pair.ns_exec(
        1,
        "python3 -c 'import socket,os\n\
         s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         msgs=[os.urandom(n) for n in (1,3,4,31,32,64,148,92,1500)]*20\n\
         msgs+=[bytes([4,0,0,0])+os.urandom(60) for _ in range(50)]\n\
         msgs+=[bytes([1,0,0,0])+os.urandom(144) for _ in range(50)]\n\
         msgs+=[bytes([5,0,0,0])+os.urandom(40), b\"\"]\n\
         [s.sendto(m, (\"10.201.0.1\", 51820)) for m in msgs]'",
    );
    pair.ns_exec(0, "ping -c 3 -i 0.2 -W 3 10.202.0.2");
    pair.tcp_transfer_checked(1, 1 << 20);
    let log_path = format!("/tmp/netns-test-{}.log", pair.ifname[0]);
    drop(pair);
    // sitelinkd logs its final counters when stopped: every kind of garbage was counted by
    // reason.
    let log = std::fs::read_to_string(&log_path).expect("sitelinkd log");
    let last = log.lines().rev().find(|l| l.contains("final counters")).expect("final counters logged");
    for reason in ["malformed", "unknown_receiver_index", "bad_mac1"] {
        assert!(last.contains(reason), "{reason} not counted: {last}");
    }
}
