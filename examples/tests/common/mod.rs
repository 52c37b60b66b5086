//! Shared helpers of the netns tests: two namespaces joined by a veth pair, one WireGuard
//! implementation in each, configured with `wg`; torn down on drop.

#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SITELINKD: &str = env!("CARGO_BIN_EXE_sitelinkd");

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Impl {
    Sitelink(&'static str),
    /// Debian's wireguard-go 0.0.20220316 (no offloads).
    WireguardGo,
    /// wireguard-go 0.0.20231211 (TUN TSO/GRO, UDP GSO/GRO), installed by
    /// ../shared/bench/install-peers.sh as `wireguard-go-2023`.
    WireguardGo2023,
    Boringtun,
    /// gotatun 0.10 (Mullvad's Rust WireGuard), installed by install-peers.sh.
    Gotatun,
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the test can run here; explains loudly when not (and fails under CI).
pub fn can_run(needs: &[&str]) -> bool {
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

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub fn must(cmd: &str) -> String {
    let (ok, text) = sh(cmd);
    assert!(ok, "`{cmd}` failed: {text}");
    text
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, a veth pair between them and one WireGuard implementation in each.
/// Everything is torn down on drop.
pub struct Pair {
    pub ns: [String; 2],
    pub ifname: [String; 2],
    pub procs: [Option<Child>; 2],
    pub env: Vec<(String, String)>,
    /// Environment for one side's implementation only.
    pub side_env: [Vec<(String, String)>; 2],
    /// Extra command-line arguments for sitelinkd, per side.
    pub extra_args: [Vec<String>; 2],
    /// The veth ends, in namespace A and B.
    pub veth: [String; 2],
    /// Private and public keys (base64) set by `configure`.
    pub keys: [String; 2],
    pub pubs: [String; 2],
    /// The endpoint each side is told its peer has.
    pub endpoints: [String; 2],
}

impl Pair {
    pub fn new() -> Pair {
        let id = format!("{}{}", std::process::id() % 10_000, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let pair = Pair {
            ns: [format!("slA{id}"), format!("slB{id}")],
            ifname: [format!("sla{id}"), format!("slb{id}")],
            procs: [None, None],
            env: Vec::new(),
            side_env: Default::default(),
            extra_args: Default::default(),
            veth: [format!("va{id}"), format!("vb{id}")],
            keys: Default::default(),
            pubs: Default::default(),
            endpoints: ["10.201.0.2:51820".into(), "10.201.0.1:51820".into()],
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

    pub fn socket(&self, side: usize) -> String {
        format!("/var/run/wireguard/{}.sock", self.ifname[side])
    }

    pub fn start(&mut self, side: usize, imp: Impl) {
        let (ns, ifname) = (&self.ns[side], &self.ifname[side]);
        let log = std::fs::File::create(format!("/tmp/netns-test-{ifname}.log")).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        match imp {
            Impl::Sitelink(backend) => {
                cmd.args([SITELINKD, "-f", "--backend", backend])
                    .args(&self.extra_args[side])
                    .arg(ifname)
                    .env("LOG_LEVEL", "debug");
            }
            Impl::WireguardGo => {
                cmd.args(["wireguard-go", "-f", ifname]).env("WG_PROCESS_FOREGROUND", "1");
            }
            Impl::WireguardGo2023 => {
                cmd.args(["wireguard-go-2023", "-f", ifname]).env("WG_PROCESS_FOREGROUND", "1");
            }
            Impl::Boringtun => {
                cmd.args(["boringtun-cli", "-f", "--disable-drop-privileges", "-t", "1", ifname])
                    .env("WG_SUDO", "1");
            }
            Impl::Gotatun => {
                cmd.args(["gotatun", "-f", "--disable-drop-privileges", ifname]);
            }
        }
        for (k, v) in self.env.iter().chain(&self.side_env[side]) {
            cmd.env(k, v);
        }
        let child =
            cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("start implementation");
        self.procs[side] = Some(child);
        let start = Instant::now();
        while !std::path::Path::new(&self.socket(side)).exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "{imp:?} did not open {}", self.socket(side));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ns_exec(&self, side: usize, cmd: &str) -> String {
        must(&format!("ip netns exec {} {cmd}", self.ns[side]))
    }

    /// Keys, ports, peers and addresses: tunnel 10.202.0.1 <-> 10.202.0.2.
    pub fn configure(&mut self) {
        for side in 0..2 {
            self.keys[side] = must("wg genkey").trim().to_owned();
            self.pubs[side] = must(&format!("echo {} | wg pubkey", self.keys[side])).trim().to_owned();
        }
        for side in 0..2 {
            self.configure_side(side);
        }
    }

    /// Configures one side with the keys and endpoints already chosen (again after a restart).
    pub fn configure_side(&self, side: usize) {
        let other = 1 - side;
        let keyfile = format!("/tmp/netns-test-{}.key", self.ifname[side]);
        std::fs::write(&keyfile, &self.keys[side]).expect("key file");
        self.ns_exec(
            side,
            &format!(
                "wg set {} private-key {keyfile} listen-port 51820 peer {} allowed-ips 10.202.0.{}/32 endpoint {}",
                self.ifname[side],
                self.pubs[other],
                other + 1,
                self.endpoints[side],
            ),
        );
        let _ = std::fs::remove_file(&keyfile);
        self.ns_exec(side, &format!("ip addr add 10.202.0.{}/24 dev {}", side + 1, self.ifname[side]));
        self.ns_exec(side, &format!("ip link set {} mtu 1420 up", self.ifname[side]));
    }

    /// Pings the other side's tunnel address from `side` until it answers or `limit` passes;
    /// returns how long it took.
    pub fn ping_until(&self, side: usize, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let (ok, _) =
                sh(&format!("ip netns exec {} ping -c 1 -W 1 10.202.0.{}", self.ns[side], 2 - side));
            if ok {
                return Some(start.elapsed());
            }
        }
        None
    }

    /// iperf3 TCP from `from` to the other side for `secs`: Gbit/s received.
    pub fn tcp_gbps(&self, from: usize, secs: u32) -> f64 {
        let to = 1 - from;
        self.ns_exec(to, "iperf3 -s -1 -D");
        std::thread::sleep(Duration::from_millis(300));
        let out = self.ns_exec(from, &format!("iperf3 -c 10.202.0.{} -t {secs} -J", to + 1));
        let key = "\"bits_per_second\":";
        // The last bits_per_second in the JSON is the receiver's summary.
        let v = out.rsplit(key).next().and_then(|s| s.trim_start().split([',', '\n', '}']).next());
        v.and_then(|v| v.trim().parse::<f64>().ok()).map(|b| b / 1e9).expect("iperf3 result")
    }

    /// Sends `count` numbered, checksummed UDP datagrams from `from` to the other side at about
    /// `per_second`, and returns what the receiver saw: (received, duplicates, corrupted).
    pub fn udp_stream_checked(&self, from: usize, count: u32, per_second: u32) -> (u32, u32, u32) {
        let r = self.start_gap_flow(from, per_second, count).finish();
        (r.received, r.duplicates, r.corrupted)
    }

    /// A second underlay path: another veth pair between the namespaces, 10.203.0.1 (A) and
    /// 10.203.0.2 (B), whose ends are returned as [A's, B's]. Gone with the namespaces.
    pub fn add_second_path(&mut self) -> [String; 2] {
        let id = &self.veth[0][2..];
        let ends = [format!("pa{id}"), format!("pb{id}")];
        let [a, b] = &self.ns;
        must(&format!("ip link add {} type veth peer name {}", ends[0], ends[1]));
        must(&format!("ip link set {} netns {a} && ip link set {} netns {b}", ends[0], ends[1]));
        must(&format!(
            "ip -n {a} addr add 10.203.0.1/24 dev {} && ip -n {b} addr add 10.203.0.2/24 dev {}",
            ends[0], ends[1]
        ));
        must(&format!("ip -n {a} link set {} up && ip -n {b} link set {} up", ends[0], ends[1]));
        ends
    }

    /// Starts a flow of `count` numbered, checksummed UDP datagrams, `per_second`, from `from`
    /// to the other side through the tunnel. [`GapFlow::finish`] tells what arrived.
    pub fn start_gap_flow(&self, from: usize, per_second: u32, count: u32) -> GapFlow {
        let to = 1 - from;
        let receiver = r#"
import socket, hashlib
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.202.0.TO", 6001))
s.settimeout(4)
seen = set(); dup = 0; bad = 0
while True:
    try:
        d = s.recv(2048)
    except socket.timeout:
        break
    body = d[:-16]
    if hashlib.sha256(body).digest()[:16] != d[-16:]:
        bad += 1
        continue
    seq = int.from_bytes(body[:8], "big")
    if seq in seen:
        dup += 1
    seen.add(seq)
top = max(seen) if seen else 0
run = longest = 0
for i in range(top + 1):
    if i in seen:
        run = 0
    else:
        run += 1
        longest = max(longest, run)
print(len(seen), dup, bad, longest)
"#
        .replace("TO", &(to + 1).to_string());
        let sender = r#"
import socket, hashlib, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
gap = 1.0 / RATE
t = time.time()
for i in range(COUNT):
    body = i.to_bytes(8, "big") + bytes((i * 31 + k) % 251 for k in range(200))
    try:
        s.sendto(body + hashlib.sha256(body).digest()[:16], ("10.202.0.TO", 6001))
    except OSError:
        pass
    t += gap
    time.sleep(max(0, t - time.time()))
"#
        .replace("TO", &(to + 1).to_string())
        .replace("RATE", &per_second.to_string())
        .replace("COUNT", &count.to_string());
        let receiver = Command::new("ip")
            .args(["netns", "exec", &self.ns[to], "python3", "-c", &receiver])
            .stdout(Stdio::piped())
            .spawn()
            .expect("receiver");
        std::thread::sleep(Duration::from_millis(300));
        let sender = Command::new("ip")
            .args(["netns", "exec", &self.ns[from], "python3", "-c", &sender])
            .spawn()
            .expect("sender");
        GapFlow { sender: Some(sender), receiver: Some(receiver), sent: count, start: Instant::now() }
    }

    /// Counters from `wg show IFNAME transfer` on `side`: (rx, tx).
    pub fn transfer(&self, side: usize) -> (u64, u64) {
        let out = self.ns_exec(side, &format!("wg show {} transfer", self.ifname[side]));
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.len(), 3, "wg show transfer: {out}");
        (f[1].parse().expect("rx"), f[2].parse().expect("tx"))
    }

    pub fn latest_handshake(&self, side: usize) -> u64 {
        let out = self.ns_exec(side, &format!("wg show {} latest-handshakes", self.ifname[side]));
        out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Sends `bytes` of a deterministic stream over TCP from `from` to the other side and
    /// checks that the receiver got exactly it (length and SHA-256).
    pub fn tcp_transfer_checked(&self, from: usize, bytes: usize) {
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
             for t in range(40):\n  try:\n    s=socket.create_connection((\"10.202.0.{}\", {port}), timeout=2); break\n  except OSError: time.sleep(0.1)\n\
             s.settimeout(30)\n\
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

impl Pair {
    /// The log file of side `side`'s implementation.
    pub fn log_path(&self, side: usize) -> String {
        format!("/tmp/netns-test-{}.log", self.ifname[side])
    }

    /// Stops side `side`'s implementation (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(&mut self, side: usize) {
        if let Some(mut p) = self.procs[side].take() {
            let _ = Command::new("kill").arg(p.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Stops sitelinkd on `side` and returns the final counters line it logged.
    pub fn stop_and_read_counters(&mut self, side: usize) -> String {
        self.stop(side);
        let log = std::fs::read_to_string(self.log_path(side)).expect("log");
        log.lines().rev().find(|l| l.contains("final counters")).expect("final counters logged").to_owned()
    }

    /// Waits up to `limit` for side `side`'s implementation to exit by itself, and returns its
    /// status; `None` if it is still running (it is then stopped on drop as usual). Once it
    /// has exited it is forgotten, so that nothing signals its id, which the system may have
    /// given to another process by then.
    pub fn wait_exit(&mut self, side: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.procs[side].as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.procs[side] = None;
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of side `side`'s implementation.
    pub fn pid(&self, side: usize) -> u32 {
        self.procs[side].as_ref().expect("running").id()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for side in 0..2 {
            self.stop(side);
        }
        for ns in &self.ns {
            let _ = sh(&format!("ip netns del {ns}"));
        }
        for side in 0..2 {
            let _ = std::fs::remove_file(self.socket(side));
        }
    }
}

pub fn needs(imp: Impl) -> Vec<&'static str> {
    let mut n = vec!["ip", "wg", "python3"];
    match imp {
        Impl::WireguardGo => n.push("wireguard-go"),
        Impl::WireguardGo2023 => n.push("wireguard-go-2023"),
        Impl::Boringtun => n.push("boringtun-cli"),
        Impl::Gotatun => n.push("gotatun"),
        Impl::Sitelink(_) => {}
    }
    n
}

/// A numbered UDP flow through a pair's tunnel (see [`Pair::start_gap_flow`]).
pub struct GapFlow {
    sender: Option<Child>,
    receiver: Option<Child>,
    /// Datagrams the sender sends in all.
    pub sent: u32,
    /// When the sender started.
    pub start: Instant,
}

/// What a [`GapFlow`]'s receiver saw.
#[derive(Debug)]
pub struct GapReport {
    pub sent: u32,
    pub received: u32,
    pub duplicates: u32,
    pub corrupted: u32,
    /// The longest run of consecutive datagrams that never arrived.
    pub longest_loss: u32,
}

impl GapFlow {
    /// Waits for the sender to finish and the receiver to give up waiting, and reports.
    pub fn finish(mut self) -> GapReport {
        let status = self.sender.take().expect("running").wait().expect("sender");
        assert!(status.success(), "UDP sender failed");
        let out = self.receiver.take().expect("running").wait_with_output().expect("receiver output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Vec<u32> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert_eq!(v.len(), 4, "receiver said {text:?}");
        GapReport { sent: self.sent, received: v[0], duplicates: v[1], corrupted: v[2], longest_loss: v[3] }
    }
}

impl Drop for GapFlow {
    fn drop(&mut self) {
        // Only the processes started here, by their handles.
        for mut child in [self.sender.take(), self.receiver.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A counter of the `io` block (the backends' `IoStats`) in sitelinkd's final counters line
/// ([`Pair::stop_and_read_counters`]).
pub fn io_counter(line: &str, name: &str) -> u64 {
    let start =
        line.find(&format!(" {name}: ")).unwrap_or_else(|| panic!("{name} not in {line}")) + name.len() + 3;
    let digits: String = line[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a count")
}
