//! sitelinkd: a userspace WireGuard built on sitelink, for `wg` and `wg-quick`.
//!
//! `sitelinkd [-f|--foreground] [--backend uring|mmsg] [--workers N] IFNAME` follows
//! wireguard-go's contract:
//! it creates the TUN interface IFNAME (or takes the descriptor in `WG_TUN_FD`), serves the
//! UAPI on /var/run/wireguard/IFNAME.sock (or on the listening descriptor in `WG_UAPI_FD`),
//! daemonizes unless `-f` is given (or `WG_PROCESS_FOREGROUND=1`), and exits cleanly on
//! SIGTERM or SIGINT, or when the interface is deleted, removing its socket. It works as
//! `WG_QUICK_USERSPACE_IMPLEMENTATION` for wg-quick. `LOG_LEVEL` (error, warn, info, debug)
//! sets the log level; logs go to standard error in the foreground, and to the file named by
//! `SITELINK_LOG_FILE` (else nowhere) when daemonized.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use sitelink::{BackendKind, LinkBuilder, Tun, uapi};

/// A userspace WireGuard built on sitelink.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Stay in the foreground.
    #[arg(short, long)]
    foreground: bool,
    /// I/O backend: uring (falls back to mmsg where io_uring is unavailable) or mmsg.
    #[arg(long, default_value = "uring", env = "SITELINK_BACKEND")]
    backend: BackendKind,
    /// For tests and fault drills: multiply every protocol timer by this (0.025 rekeys every
    /// 3 s). Both ends must agree. Never use it on a production link.
    #[arg(long, env = "SITELINK_TEST_TIME_SCALE", hide = true)]
    time_scale: Option<f64>,
    /// For tests: make a worker panic this many seconds after start, to check that the
    /// daemon then exits non-zero for its supervisor. Never use it on a production link.
    #[arg(long, env = "SITELINK_TEST_WORKER_PANIC_AFTER", hide = true)]
    test_worker_panic_after: Option<f64>,
    /// A wg-quick style file to configure the link from at start (`wg setconf` can change it
    /// later). A file that others may read is warned about.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Worker threads, each with its own TUN queue, UDP socket and ring (the interface is
    /// created multi-queue when more than one).
    #[arg(long, default_value_t = 1, env = "SITELINK_WORKERS",
          value_parser = clap::value_parser!(u16).range(1..=sitelink::MAX_WORKERS as i64))]
    workers: u16,
    /// Tunnel MTU set on a newly created interface.
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Interface name.
    ifname: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!("sitelink={level},sitelinkd={level}")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let foreground = args.foreground || std::env::var("WG_PROCESS_FOREGROUND").is_ok_and(|v| v == "1");
    if !foreground {
        return daemonize(&args);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts a detached copy of this program in the foreground mode, waits until it serves the
/// UAPI socket (or dies), and exits: wg-quick sees the socket as soon as we return.
fn daemonize(args: &Args) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sitelinkd: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut child = match Command::new(exe)
        .arg("--foreground")
        .arg("--backend")
        .arg(args.backend.name())
        .arg("--mtu")
        .arg(args.mtu.to_string())
        .arg("--workers")
        .arg(args.workers.to_string())
        .args(args.time_scale.map(|f| format!("--time-scale={f}")))
        .args(args.test_worker_panic_after.map(|s| format!("--test-worker-panic-after={s}")))
        .args(args.config.iter().flat_map(|c| [std::ffi::OsString::from("--config"), c.clone().into()]))
        .arg(&args.ifname)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The detached daemon must not hold the caller's descriptors open (whoever reads our
        // output through a pipe, as scripts around wg-quick do, would wait forever). Its log
        // goes to SITELINK_LOG_FILE if set, else nowhere.
        .stderr(daemon_log())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sitelinkd: cannot start the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    let uapi_fd_given = std::env::var("WG_UAPI_FD").is_ok();
    let path = uapi::socket_path(&args.ifname);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("sitelinkd: the daemon exited early: {status}");
            return ExitCode::FAILURE;
        }
        if uapi_fd_given || path.exists() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("sitelinkd: the daemon did not open {}", path.display());
    ExitCode::FAILURE
}

/// Where a daemonized sitelinkd logs: the file named by SITELINK_LOG_FILE, else nowhere.
fn daemon_log() -> Stdio {
    std::env::var_os("SITELINK_LOG_FILE")
        .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok())
        .map_or_else(Stdio::null, Stdio::from)
}

/// Removes the UAPI socket when dropped.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    sitelink_io::block_termination_signals().map_err(|e| format!("blocking signals: {e}"))?;
    let tun = match sitelink_io::take_inherited_fd("WG_TUN_FD").map_err(|e| e.to_string())? {
        Some(fd) => Tun::from_fd(fd).map_err(|e| format!("WG_TUN_FD: {e}"))?,
        None => {
            let tun = open_tun(&args.ifname, args.workers > 1)
                .map_err(|e| format!("creating TUN {}: {e}", args.ifname))?;
            tun.set_mtu(args.mtu).map_err(|e| format!("setting the MTU of {}: {e}", tun.name()))?;
            tun
        }
    };
    let ifname = tun.name().to_owned();
    let mtu = tun.mtu().unwrap_or(args.mtu) as usize;
    let (listener, socket_file) =
        match sitelink_io::take_inherited_fd("WG_UAPI_FD").map_err(|e| e.to_string())? {
            // The parent handed this listening socket over to us.
            Some(fd) => (UnixListener::from(fd), SocketFile(None)),
            None => {
                let path = uapi::socket_path(&ifname);
                let l = uapi::bind(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
                (l, SocketFile(Some(path)))
            }
        };
    let mut builder =
        LinkBuilder::unkeyed().backend(args.backend).mtu(mtu).workers(usize::from(args.workers));
    if let Some(f) = args.time_scale {
        tracing::warn!(factor = f, "protocol timers scaled for testing");
        builder = builder.timing(sitelink::Timing::scaled(f));
    }
    let link = builder.start_tun(tun).map_err(|e| format!("starting the link: {e}"))?;
    if let Some(path) = &args.config {
        apply_config(&link, path)?;
    }
    tracing::info!(
        interface = %ifname,
        backend = link.backend().name(),
        workers = link.workers(),
        port = link.port(),
        "sitelinkd running"
    );
    let link = Arc::new(link);
    uapi::serve(Arc::clone(&link), listener).map_err(|e| format!("starting the UAPI server: {e}"))?;
    if let Some(secs) = args.test_worker_panic_after {
        tracing::warn!(after_seconds = secs, "a worker panic will be injected (test)");
        let link = Arc::clone(&link);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
            link.inject_worker_panic();
        });
    }
    loop {
        if let Some(sig) = sitelink_io::wait_termination_signal(Duration::from_millis(500)) {
            tracing::info!(signal = sig, "stopping");
            break;
        }
        // A failed worker stopped the link: exit non-zero so that a supervisor restarts us.
        // (Checked before `is_stopped`, which a worker blocked on the failed one may delay.)
        if let Some(failure) = link.failure() {
            return Err(format!("the link failed: {failure}"));
        }
        if link.is_stopped() {
            tracing::info!("the link stopped");
            break;
        }
    }
    link.shutdown();
    let stats = link.stats();
    tracing::info!(
        sessions = stats.device.sessions_established,
        buffers = stats.buffers_allocated,
        cookie_replies = stats.device.cookie_replies_sent,
        drops = ?stats.device.drops,
        io = ?stats.io,
        tun_rx_per_worker = ?stats.io_per_worker.iter().map(|w| w.tun_rx).collect::<Vec<_>>(),
        udp_rx_per_worker = ?stats.io_per_worker.iter().map(|w| w.udp_rx).collect::<Vec<_>>(),
        opens_shared = stats.opens_shared,
        "final counters"
    );
    drop(socket_file);
    Ok(())
}

/// Configures `link` from a wg-quick style file.
fn apply_config(link: &sitelink::Link, path: &std::path::Path) -> Result<(), String> {
    let (config, warnings) = sitelink::conf::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let ifc = config.interface;
    if let Some(key) = ifc.private_key {
        link.set_private_key(key);
    }
    if let Some(port) = ifc.listen_port {
        link.set_listen_port(port).map_err(|e| format!("ListenPort {port}: {e}"))?;
    }
    if let Some(mark) = ifc.fwmark {
        link.set_fwmark(mark);
    }
    for peer in config.peers {
        link.set_peer(peer).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Opens the TUN interface, waiting a little while it is still held by a process that just
/// exited (the kernel may release it asynchronously).
fn open_tun(name: &str, multi_queue: bool) -> std::io::Result<Tun> {
    const EBUSY: i32 = 16;
    let start = Instant::now();
    loop {
        match Tun::open(name, multi_queue) {
            Err(e) if e.raw_os_error() == Some(EBUSY) && start.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}
