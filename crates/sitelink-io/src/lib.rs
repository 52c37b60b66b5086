//! The only part of sitelink that talks to the kernel.
//!
//! * [`Tun`]: a TUN interface (created or attached by name, multi-queue capable, or an already
//!   open descriptor), and [`PacketPipe`], the same packet-at-a-time contract over a Unix
//!   datagram socket pair: a stand-in for a TUN device where there is none (the backends'
//!   tests). An embedded link uses [`PacketQueues`] instead, which cost no system call.
//! * [`PacketQueues`] and [`InProcessSide`] ([`in_process`]): the packet side of an embedded
//!   link, bounded lock-free queues between the application's threads and the workers, with
//!   pooled buffers written through `bytes::BufMut` and an eventfd for event loops: no system
//!   call and no copy per packet.
//! * [`UdpSocket`]: the dual-stack UDP socket with large buffers and options set up front.
//! * [`PacketIo`]: batched I/O of both, one trait with two backends: [`BackendKind::Uring`]
//!   (io_uring: reads, writes and sends submitted in batches, one enter per batch) and
//!   [`BackendKind::Mmsg`] (`recvmmsg`/`sendmmsg` with UDP GSO, and `epoll`).
//!   [`open_backend`] picks io_uring and falls back to `mmsg` when the kernel or a seccomp
//!   profile refuses it, saying why once.
//!
//! The crate knows packet buffers ([`sitelink_frame`]), not the protocol. Every `unsafe`
//! block lives in the private `sys` module (and `sys::uring`), each with a `// SAFETY:` line;
//! the crate root denies `unsafe` everywhere else.

#![deny(unsafe_code)]

mod aqm;
mod backend;
mod calls;
mod faults;
mod gro;
mod inproc;
mod mmsg;
mod peers;
mod socket;
mod stats;
mod tun;
mod uring;
mod vnet;
mod waker;
// Every `unsafe` of the crate is in `sys`; the rest may not hold any.
#[allow(unsafe_code)]
mod sys;

use std::io;
use std::os::fd::OwnedFd;

pub use backend::{BackendKind, PacketIo};
pub use faults::Fault;
pub use inproc::{
    INBOUND_QUEUE, InPacket, InProcessSide, InProcessStats, OUTBOUND_QUEUE, OutPacket, PacketQueues,
    in_process,
};
pub use mmsg::MmsgIo;
pub use peers::MAX_CONNECTED_PEERS;
pub use socket::{UdpConfig, UdpSocket};
pub use stats::IoStats;
pub use sys::adopt_inherited_fd;
pub use tun::{PacketFd, PacketPipe, Tun, TunOffloads};
pub use uring::{DEFAULT_IDLE_AFTER, UringIo};
pub use waker::Waker;

/// Helpers for tests of this crate and the ones above, which may not hold `unsafe`
/// themselves; only with the `testing` feature, never part of the API.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::faults::force as force_refusal;
    pub use crate::sys::counting::CountingAllocator;

    /// How many `uring` backends were dropped with requests still in flight, their memory
    /// leaked rather than freed under the kernel (see [`UringIo`](crate::UringIo)'s `Drop`).
    pub fn uring_drops_leaked() -> u64 {
        crate::sys::ring::DROPS_LEAKED.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Datagrams or packets moved per batch by default.
pub const DEFAULT_BATCH: usize = 64;

/// The largest datagram or packet that counts as small (a ping's, an acknowledgement's, a
/// voice frame's: not a bulk transfer's segment). The backends hand small ones out ahead of
/// bulk that arrived with them, CoDel never drops them, and a worker sends them through a
/// pass of their own before the bulk's.
pub const SMALL_PACKET: usize = 256;

/// The most pooled buffers a backend keeps lent to its UDP receives with GRO on: each
/// receive is laid out over a buffer per datagram it may bring (see `gro.rs`). A worker's pool
/// needs these on top of what its turns have in flight.
pub const GRO_RECEIVE_BUFFERS: usize = gro::HELD_SLOTS * gro::GRO_MAX_SEGMENTS;

/// Opens the backend `kind` over `packets` (a TUN queue or pipe; `None` when the worker moves
/// packets in process, as an embedded link does) and `udp`. If io_uring is asked for but
/// cannot be set up (an old kernel's ENOSYS, a container's EPERM), falls back to `mmsg` and
/// returns the reason as the second value, for the caller to log once.
pub fn open_backend(
    kind: BackendKind,
    packets: Option<PacketFd>,
    udp: UdpSocket,
    batch: usize,
) -> io::Result<(Box<dyn PacketIo>, Option<String>)> {
    let batch = batch.clamp(1, 1024);
    let mmsg = |packets: Option<PacketFd>, udp| match packets {
        Some(p) => MmsgIo::new(p, udp, batch),
        None => MmsgIo::without_packets(udp, batch),
    };
    match kind {
        BackendKind::Mmsg => Ok((Box::new(mmsg(packets, udp)?), None)),
        BackendKind::Uring => match sys::ring::probe() {
            Ok(()) => {
                let io = match packets {
                    Some(p) => UringIo::new(p, udp, batch)?,
                    None => UringIo::without_packets(udp, batch)?,
                };
                Ok((Box::new(io), None))
            }
            Err(e) => {
                let why = format!("io_uring unavailable ({e}); using the mmsg backend");
                Ok((Box::new(mmsg(packets, udp)?), Some(why)))
            }
        },
    }
}

/// A thread's scheduling (policy, nice value, real-time priority, slice), read from the
/// calling thread with [`ThreadScheduling::current`], changed, and applied to the calling
/// thread with [`ThreadScheduling::apply`]. What is not changed is written back as it was:
/// an operator's `nice` or systemd `Nice=` for the daemon stays with its workers.
#[derive(Clone, Copy)]
pub struct ThreadScheduling {
    attr: libc::sched_attr,
}

impl ThreadScheduling {
    /// The calling thread's scheduling (`sched_getattr`).
    pub fn current() -> io::Result<ThreadScheduling> {
        sys::thread_sched_attr().map(|attr| ThreadScheduling { attr })
    }

    /// In the fair class (`SCHED_OTHER`, `SCHED_BATCH` or `SCHED_IDLE`).
    pub fn is_fair(&self) -> bool {
        [libc::SCHED_OTHER, libc::SCHED_BATCH, libc::SCHED_IDLE]
            .iter()
            .any(|p| *p as u32 == self.attr.sched_policy)
    }

    /// Under `SCHED_FIFO` or `SCHED_RR`.
    pub fn is_real_time(&self) -> bool {
        [libc::SCHED_FIFO, libc::SCHED_RR].iter().any(|p| *p as u32 == self.attr.sched_policy)
    }

    /// The nice value (meaningful in the fair class).
    pub fn nice(&self) -> i32 {
        self.attr.sched_nice
    }

    /// The same with slices of `slice` where it is in the fair class (`sched_runtime`, Linux
    /// 6.12+ with EEVDF; older kernels take it and ignore it), else unchanged. A thread that
    /// asks for short slices gets an earlier deadline, so that when it wakes (a packet came)
    /// it runs before a busy thread that asked for none, instead of waiting out that
    /// thread's slice. Its share of the processor is unchanged, and no privilege is needed.
    pub fn with_slice(mut self, slice: std::time::Duration) -> ThreadScheduling {
        if self.is_fair() {
            self.attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
            self.attr.sched_flags &= libc::SCHED_FLAG_RESET_ON_FORK as u64;
        }
        self
    }

    /// The same under `SCHED_FIFO` at `priority` (1-99): the thread runs as soon as it wakes,
    /// ahead of every thread in the fair class, until it sleeps. Applying it needs
    /// `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO`), and a cgroup that grants real-time time.
    pub fn real_time(mut self, priority: u8) -> ThreadScheduling {
        self.attr.sched_policy = libc::SCHED_FIFO as u32;
        self.attr.sched_priority = u32::from(priority.clamp(1, 99));
        self.attr.sched_runtime = 0;
        self.attr.sched_flags &= libc::SCHED_FLAG_RESET_ON_FORK as u64;
        self
    }

    /// Applies this scheduling to the calling thread (`sched_setattr`).
    pub fn apply(&self) -> io::Result<()> {
        sys::set_thread_sched_attr(&self.attr)
    }
}

impl std::fmt::Debug for ThreadScheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadScheduling")
            .field("policy", &self.attr.sched_policy)
            .field("nice", &self.attr.sched_nice)
            .field("priority", &self.attr.sched_priority)
            .field("slice_ns", &self.attr.sched_runtime)
            .finish()
    }
}

/// Asks the scheduler for short slices for the calling thread (a link's worker), keeping its
/// policy and nice value: [`ThreadScheduling::with_slice`].
pub fn request_short_slices(slice: std::time::Duration) -> io::Result<()> {
    ThreadScheduling::current()?.with_slice(slice).apply()
}

/// The processor time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): its own
/// code and the kernel's work in its system calls.
pub fn thread_cpu_time() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
}

/// Whether this process runs as root (netns and TUN tests need it).
pub fn is_root() -> bool {
    sys::is_root()
}

/// Whether an error from the TUN side means the device is gone (the interface was deleted),
/// so that a worker stops instead of retrying forever.
pub fn is_device_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADFD) | Some(libc::ENXIO) | Some(libc::ENODEV))
}

/// Takes the descriptor a parent process handed over in environment variable `var` (such as
/// `WG_TUN_FD` or `WG_UAPI_FD`): `Ok(None)` if the variable is not set. Each variable can be
/// taken once per process (a second take is an error), so safe code cannot make two owners
/// of one descriptor this way; setting the variable after start is itself `unsafe`.
pub fn take_inherited_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    match std::env::var(var) {
        Ok(value) => sys::take_numbered_fd(var, &value).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{var} is not a descriptor number")))
        }
    }
}

#[cfg(test)]
mod scheduling_tests {
    use super::*;
    use std::time::Duration;

    /// Sets the calling thread's nice value (raising it needs no privilege).
    fn set_nice(nice: i32) {
        let mut s = ThreadScheduling::current().unwrap();
        s.attr.sched_nice = nice;
        s.apply().unwrap();
    }

    #[test]
    fn a_short_slice_keeps_the_threads_nice_value() {
        // On a thread of its own: the nice value stays with it.
        std::thread::spawn(|| {
            set_nice(7);
            match request_short_slices(Duration::from_micros(300)) {
                Ok(()) => {
                    let now = ThreadScheduling::current().unwrap();
                    assert!(now.is_fair());
                    // Kernels before 6.12 take the call and keep no slice.
                    let slice = now.attr.sched_runtime;
                    assert!(slice == 0 || slice == 300_000, "{slice}");
                }
                Err(e) => eprintln!("sched_setattr refused a slice here ({e})"),
            }
            assert_eq!(ThreadScheduling::current().unwrap().nice(), 7);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn real_time_and_back_to_the_fair_class_as_it_was() {
        std::thread::spawn(|| {
            set_nice(3);
            let fair = ThreadScheduling::current().unwrap().with_slice(Duration::from_micros(100));
            if let Err(e) = fair.real_time(1).apply() {
                // Without CAP_SYS_NICE: not root. As root (and so in CI) it must work.
                assert!(!is_root(), "real-time scheduling refused to root: {e}");
                eprintln!("SKIPPED: real-time scheduling needs root ({e})");
                return;
            }
            let rt = ThreadScheduling::current().unwrap();
            assert!(rt.is_real_time() && !rt.is_fair());
            assert_eq!((rt.attr.sched_policy, rt.attr.sched_priority), (libc::SCHED_FIFO as u32, 1));
            fair.apply().unwrap();
            let back = ThreadScheduling::current().unwrap();
            assert!(back.is_fair());
            assert_eq!(back.nice(), 3);
        })
        .join()
        .unwrap();
    }
}
