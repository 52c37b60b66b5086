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

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use clap::builder::BoolishValueParser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use sitelink::{BackendKind, LinkBuilder, LinkError, Tun, uapi};

/// Why sitelinkd could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    /// A descriptor handed over in WG_TUN_FD or WG_UAPI_FD could not be taken.
    #[error("{0}")]
    InheritedFd(io::Error),
    /// The TUN interface could not be created or set up.
    #[error("{what} {name}: {source}")]
    Tun { what: &'static str, name: String, source: io::Error },
    /// The UAPI socket could not be created or served.
    #[error("{what} {path}: {source}")]
    Uapi { what: &'static str, path: String, source: io::Error },
    /// The configuration file could not be read or applied.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The link could not start.
    #[error("starting the link: {0}")]
    Link(#[from] LinkError),
    /// Signal handlers could not be installed.
    #[error("watching for signals: {0}")]
    Signals(io::Error),
    /// A worker failed and stopped the link (see `Link::failure`).
    #[error("the link failed: {0}")]
    Failed(String),
}

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
    /// No segmentation offloads: the TUN device is opened without a virtio-net header (one
    /// packet per read and write) and datagrams are received one by one, for a kernel whose
    /// offloads misbehave.
    #[arg(long, env = "SITELINK_NO_OFFLOAD", value_parser = BoolishValueParser::new())]
    no_offload: bool,
    /// Run the workers under SCHED_FIFO (priority 1) while the link is loaded and they have
    /// time to spare (the default), so that a packet through a loaded link does not wait for a
    /// processor behind busy applications. A worker takes real time once it uses over 8% of a
    /// processor and leaves it under 3% (idle), over 97% (a flood; until it is under 50%), or
    /// over 40% for 500 ms in turns of under 8 KiB each (small packets one by one, which move
    /// faster in batches; until it is under 20%, or for 5 s). Needs CAP_SYS_NICE; refused,
    /// the workers stay in the fair class and the log says so. `--realtime=false` (or
    /// SITELINK_REALTIME=0, or --no-realtime) keeps them in the fair class, for a machine
    /// whose other threads must never wait behind the link.
    #[arg(
        long,
        env = "SITELINK_REALTIME",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "true"
    )]
    realtime: bool,
    /// The workers stay in the fair class, whatever `--realtime` or SITELINK_REALTIME say.
    #[arg(long)]
    no_realtime: bool,
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

/// The real-time priority of the workers: the lowest, above every thread of the fair class
/// and below the kernel's own real-time threads.
const WORKER_PRIORITY: u8 = 1;

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

/// Starts a detached copy of this program in the foreground mode, with the arguments we were
/// given (so every flag reaches it without being listed twice), waits until it serves the
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
        .args(std::env::args_os().skip(1))
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

fn run(args: &Args) -> Result<(), DaemonError> {
    // SIGINT, SIGTERM and SIGHUP stop the daemon cleanly; installed before anything starts.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(DaemonError::Signals)?;
    let tun = match sitelink_io::take_inherited_fd("WG_TUN_FD").map_err(DaemonError::InheritedFd)? {
        Some(fd) => Tun::from_fd(fd).map_err(|source| DaemonError::Tun {
            what: "taking",
            name: "WG_TUN_FD".into(),
            source,
        })?,
        None => {
            let name = args.ifname.clone();
            let tun = open_tun(&name, args.workers > 1, !args.no_offload)
                .map_err(|source| DaemonError::Tun { what: "creating TUN", name: name.clone(), source })?;
            tun.set_mtu(args.mtu).map_err(|source| DaemonError::Tun {
                what: "setting the MTU of",
                name,
                source,
            })?;
            tun
        }
    };
    let ifname = tun.name().to_owned();
    let mtu = tun.mtu().unwrap_or(args.mtu) as usize;
    let (listener, socket_file) =
        match sitelink_io::take_inherited_fd("WG_UAPI_FD").map_err(DaemonError::InheritedFd)? {
            // The parent handed this listening socket over to us.
            Some(fd) => (UnixListener::from(fd), SocketFile(None)),
            None => {
                let path = uapi::socket_path(&ifname);
                let l = uapi::bind(&path).map_err(|source| DaemonError::Uapi {
                    what: "creating",
                    path: path.display().to_string(),
                    source,
                })?;
                (l, SocketFile(Some(path)))
            }
        };
    let mut builder = LinkBuilder::unkeyed()
        .backend(args.backend)
        .mtu(mtu)
        .workers(usize::from(args.workers))
        .offload(!args.no_offload)
        .real_time_workers((args.realtime && !args.no_realtime).then_some(WORKER_PRIORITY));
    if let Some(f) = args.time_scale {
        tracing::warn!(factor = f, "protocol timers scaled for testing");
        builder = builder.timing(sitelink::Timing::scaled(f));
    }
    let offloads = tun.offloads();
    let link = builder.start_tun(tun)?;
    if let Some(path) = &args.config {
        apply_config(&link, path)?;
    }
    tracing::info!(
        interface = %ifname,
        backend = link.backend().name(),
        workers = link.workers(),
        port = link.port(),
        tso = offloads.tso && !args.no_offload,
        uso = offloads.uso && !args.no_offload,
        "sitelinkd running"
    );
    let link = Arc::new(link);
    uapi::serve(Arc::clone(&link), listener).map_err(|source| DaemonError::Uapi {
        what: "serving",
        path: ifname.clone(),
        source,
    })?;
    if let Some(secs) = args.test_worker_panic_after {
        tracing::warn!(after_seconds = secs, "a worker panic will be injected (test)");
        let link = Arc::clone(&link);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs.max(0.0)));
            link.inject_worker_panic();
        });
    }
    // A signal stops the link; the main thread waits for the link to stop, whatever the cause
    // (a signal, the interface deleted, a worker failing). Nothing polls.
    let signals_handle = signals.handle();
    let on_signal = {
        let link = Arc::clone(&link);
        let ifname = ifname.clone();
        std::thread::Builder::new().name("sitelinkd-signals".into()).spawn(move || {
            let signal = signals.forever().next()?;
            tracing::info!(signal, "stopping");
            // Read while the device is still there (it goes with the link).
            let drops = tun_queue_drops(&ifname);
            link.shutdown();
            Some(drops)
        })
    }
    .map_err(DaemonError::Signals)?;
    link.wait_stopped(None);
    // A failed worker stopped the link: exit non-zero so that a supervisor restarts us, at
    // once (a worker waiting on the failed one may never return to be joined).
    if let Some(failure) = link.failure() {
        return Err(DaemonError::Failed(failure));
    }
    signals_handle.close();
    let tun_queue_drops = match on_signal.join().ok().flatten() {
        Some(drops) => drops,
        None => {
            tracing::info!("the link stopped");
            tun_queue_drops(&ifname)
        }
    };
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
        tun_queue_drops = ?tun_queue_drops,
        "final counters"
    );
    drop(socket_file);
    Ok(())
}

/// Packets the kernel dropped at the TUN device's queue, which it had for sitelinkd to read
/// while that queue was full (the device's `tx_dropped`): a sending application's loss that
/// happens before any counter of ours sees the packet (a UDP flood faster than the workers).
/// `None` where sysfs does not show the device.
fn tun_queue_drops(ifname: &str) -> Option<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/tx_dropped");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Configures `link` from a wg-quick style file.
fn apply_config(link: &sitelink::Link, path: &std::path::Path) -> Result<(), DaemonError> {
    let failed = |message: String| DaemonError::Config { path: path.to_owned(), message };
    let (config, warnings) = sitelink::conf::load(path).map_err(|e| failed(e.to_string()))?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let ifc = config.interface;
    if let Some(key) = ifc.private_key {
        link.set_private_key(key);
    }
    if let Some(port) = ifc.listen_port {
        link.set_listen_port(port).map_err(|e| failed(format!("ListenPort {port}: {e}")))?;
    }
    if let Some(mark) = ifc.fwmark {
        link.set_fwmark(mark);
    }
    for peer in config.peers {
        link.set_peer(peer).map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// Opens the TUN interface, waiting a little while it is still held by a process that just
/// exited (the kernel may release it asynchronously).
fn open_tun(name: &str, multi_queue: bool, offload: bool) -> std::io::Result<Tun> {
    const EBUSY: i32 = 16;
    let start = Instant::now();
    loop {
        let opened = if offload {
            Tun::open(name, multi_queue)
        } else {
            Tun::open_without_offloads(name, multi_queue)
        };
        match opened {
            Err(e) if e.raw_os_error() == Some(EBUSY) && start.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}
