//! The packet side: a TUN interface, or the in-process pipe that stands in for one, and the
//! descriptor a backend moves packets on.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::sys;

/// What a TUN descriptor does beyond one plain packet per read and write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// Every packet read or written starts with a virtio-net header (`IFF_VNET_HDR`). Writes
    /// may then be TCP super-packets, coalesced from a batch, whatever the flags below.
    pub vnet_hdr: bool,
    /// The kernel hands over TCP super-packets of up to 64 KiB and partial checksums
    /// (`TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` accepted).
    pub tso: bool,
    /// The kernel hands over UDP super-packets too (`TUN_F_USO4 | TUN_F_USO6`, Linux 6.2+).
    pub uso: bool,
    /// `TUNSETOFFLOAD` was refused: the errno (no super-packets come in; writes may still
    /// coalesce when `vnet_hdr` is on).
    pub tso_refused: Option<i32>,
    /// `TUNSETOFFLOAD` with USO was refused: the errno (TCP offloads may still be on).
    pub uso_refused: Option<i32>,
}

impl TunOffloads {
    /// Asks the kernel for every offload sitelink handles on `fd` (opened with
    /// `IFF_VNET_HDR`), settling for fewer where it refuses: TSO and USO, then TSO alone,
    /// then none (packets still carry the header).
    fn negotiate(fd: BorrowedFd<'_>) -> TunOffloads {
        let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        let mut o = TunOffloads { vnet_hdr: true, ..TunOffloads::default() };
        match sys::tun_set_offload(fd, tso | uso) {
            Ok(()) => {
                o.tso = true;
                o.uso = true;
                return o;
            }
            Err(e) => o.uso_refused = Some(e.raw_os_error().unwrap_or(0)),
        }
        match sys::tun_set_offload(fd, tso) {
            Ok(()) => o.tso = true,
            Err(e) => o.tso_refused = Some(e.raw_os_error().unwrap_or(0)),
        }
        o
    }

    /// The `TUN_F_*` flags these offloads are.
    fn flags(&self) -> libc::c_uint {
        let mut flags = 0;
        if self.tso {
            flags |= libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        }
        if self.uso {
            flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
        }
        flags
    }

    /// Says once, in the log, which offloads the kernel refused.
    fn log_refusals(&self, name: &str) {
        if let Some(errno) = self.tso_refused {
            tracing::warn!(
                interface = name,
                "TUN offloads refused by the kernel ({}); reading one packet at a time",
                io::Error::from_raw_os_error(errno)
            );
        } else if let Some(errno) = self.uso_refused {
            tracing::info!(
                interface = name,
                "TUN UDP segmentation offload refused by the kernel ({}); TCP offloads on",
                io::Error::from_raw_os_error(errno)
            );
        }
    }
}

/// A TUN interface (layer 3, no packet information header): one IP packet per read or write,
/// or, with offloads ([`Tun::open`]), a virtio-net header and a packet or super-packet.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
    offloads: TunOffloads,
}

impl Tun {
    /// Creates the TUN interface `name`, or attaches to it if it exists, with segmentation
    /// offloads where the kernel has them (see [`TunOffloads`]: TCP and UDP super-packets of
    /// up to 64 KiB each way, instead of a system call per packet; what the kernel refuses is
    /// logged once and left off). With `multi_queue`, each call attaches one more queue (one
    /// per worker; see [`open_queue`](Self::open_queue)). Needs CAP_NET_ADMIN.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tun> {
        let tun = Tun::open_queue_of(name, multi_queue, true)?;
        tun.offloads.log_refusals(&tun.name);
        Ok(tun)
    }

    /// As [`open`](Self::open), with no offloads at all: one plain IP packet per read and
    /// write (for a kernel whose offloads misbehave).
    pub fn open_without_offloads(name: &str, multi_queue: bool) -> io::Result<Tun> {
        Tun::open_queue_of(name, multi_queue, false)
    }

    fn open_queue_of(name: &str, multi_queue: bool, vnet_hdr: bool) -> io::Result<Tun> {
        let (fd, name) = sys::tun_open(name, multi_queue, vnet_hdr)?;
        let offloads = if vnet_hdr { TunOffloads::negotiate(fd.as_fd()) } else { TunOffloads::default() };
        Ok(Tun { fd, name, multi_queue, offloads })
    }

    /// Takes an already open TUN descriptor (such as one handed over in `WG_TUN_FD`). If it
    /// was opened with `IFF_VNET_HDR`, offloads are asked for as [`open`](Self::open) does.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tun> {
        let info = sys::tun_info(fd.as_fd())?;
        let offloads =
            if info.vnet_hdr { TunOffloads::negotiate(fd.as_fd()) } else { TunOffloads::default() };
        offloads.log_refusals(&info.name);
        Ok(Tun { fd, name: info.name, multi_queue: info.multi_queue, offloads })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface was attached with `IFF_MULTI_QUEUE`, so that more queues can be
    /// attached to it.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// The offloads in effect.
    pub fn offloads(&self) -> TunOffloads {
        self.offloads
    }

    /// Turns the offloads off (`TUNSETOFFLOAD` with none), for a descriptor already opened
    /// with them: the kernel hands over plain packets, and the link writes no super-packets.
    /// The virtio-net header stays (it is fixed when the descriptor attaches).
    pub fn disable_offloads(&mut self) -> io::Result<()> {
        if self.offloads.vnet_hdr && (self.offloads.tso || self.offloads.uso) {
            sys::tun_set_offload(self.fd.as_fd(), 0)?;
        }
        self.offloads = TunOffloads { vnet_hdr: self.offloads.vnet_hdr, ..TunOffloads::default() };
        Ok(())
    }

    /// Attaches one more queue to this multi-queue interface: the kernel spreads the packets
    /// it hands to userspace over the queues by flow, keeping each flow on one queue. The
    /// queue has this one's header and offloads (the kernel requires the one, and sets the
    /// other per device). Fails with `InvalidInput` if the interface is not multi-queue.
    pub fn open_queue(&self) -> io::Result<Tun> {
        if !self.multi_queue {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the TUN interface is not multi-queue"));
        }
        let (fd, name) = sys::tun_open(&self.name, true, self.offloads.vnet_hdr)?;
        if self.offloads.vnet_hdr {
            // The same request on every queue (the kernel keeps one set per device); what
            // the first queue settled for stands.
            let _ = sys::tun_set_offload(fd.as_fd(), self.offloads.flags());
        }
        Ok(Tun { fd, name, multi_queue: true, offloads: self.offloads })
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        sys::set_mtu(&self.name, mtu)
    }

    /// The interface MTU.
    pub fn mtu(&self) -> io::Result<u32> {
        sys::mtu(&self.name)
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> io::Result<()> {
        sys::set_up(&self.name)
    }

    /// The descriptor, for a backend.
    pub fn into_packet_fd(self) -> PacketFd {
        PacketFd { fd: self.fd, offloads: self.offloads }
    }
}

/// A descriptor that moves IP packets, one per `read`/`write` (or, with
/// [`TunOffloads::vnet_hdr`], a virtio-net header and a packet or super-packet): a TUN device
/// or one end of a [`PacketPipe`].
#[derive(Debug)]
pub struct PacketFd {
    fd: OwnedFd,
    offloads: TunOffloads,
}

impl PacketFd {
    /// The offloads this descriptor was opened with.
    pub fn offloads(&self) -> TunOffloads {
        self.offloads
    }
}

impl AsFd for PacketFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A TUN stand-in over Unix datagram sockets, for backends driven without a TUN device (their
/// tests): a system call and a copy per packet each way, so an embedded link uses
/// [`PacketQueues`](crate::PacketQueues) instead.
///
/// The application's end: IP packets go in with [`send`](Self::send) and
/// come out with [`recv`](Self::recv), as they would through a TUN device, with no root and no
/// interface. The link holds the other ends (see [`PacketPipe::with_queues`]).
///
/// Like a multi-queue TUN device, a pipe has one queue per link worker: [`send`](Self::send)
/// picks the queue by the packet's flow ([`sitelink_frame::ip::flow_hash`]), so that each flow
/// stays on one worker and in order, and [`recv`](Self::recv) takes from every queue.
#[derive(Debug)]
pub struct PacketPipe {
    queues: Vec<OwnedFd>,
    /// Where [`recv`](Self::recv) looks first: queues take turns, so none starves.
    next_recv: std::sync::atomic::AtomicUsize,
    /// [`recv`](Self::recv)'s timeout in nanoseconds (`u64::MAX` for none), with several queues.
    read_timeout_ns: std::sync::atomic::AtomicU64,
}

impl PacketPipe {
    /// A connected pair: the application's end and the link's end. Packets up to 64 KiB.
    pub fn pair() -> io::Result<(PacketPipe, PacketFd)> {
        let (pipe, mut ends) = PacketPipe::with_queues(1)?;
        Ok((pipe, ends.pop().expect("one queue")))
    }

    /// The application's end with `queues` queues (1 to 64), and the link's end of each.
    pub fn with_queues(queues: usize) -> io::Result<(PacketPipe, Vec<PacketFd>)> {
        if !(1..=sys::POLL_MAX).contains(&queues) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a packet pipe has 1 to 64 queues"));
        }
        let mut app = Vec::with_capacity(queues);
        let mut link = Vec::with_capacity(queues);
        for _ in 0..queues {
            // A datagram socket pair keeps packet boundaries, as TUN does.
            let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
            app.push(OwnedFd::from(a));
            link.push(PacketFd { fd: OwnedFd::from(b), offloads: TunOffloads::default() });
        }
        let pipe = PacketPipe {
            queues: app,
            next_recv: Default::default(),
            read_timeout_ns: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        Ok((pipe, link))
    }

    /// The number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Hands one IP packet to the link, blocking while its queue is full.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let q = match self.queues.len() {
            1 => 0,
            n => sitelink_frame::ip::flow_hash(packet) as usize % n,
        };
        sys::write(self.queues[q].as_fd(), packet).map(|_| ())
    }

    /// Takes one IP packet from the link into `buf`, blocking until one comes (or until
    /// `timeout`, if [`set_read_timeout`](Self::set_read_timeout) set one, with `WouldBlock`).
    /// Returns its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.queues.len() == 1 {
            return sys::read(self.queues[0].as_fd(), buf);
        }
        let n = self.queues.len();
        let timeout_ns = self.read_timeout_ns.load(Relaxed);
        let deadline =
            (timeout_ns != u64::MAX).then(|| std::time::Instant::now() + Duration::from_nanos(timeout_ns));
        let mut ready = [false; sys::POLL_MAX];
        loop {
            let first = self.next_recv.fetch_add(1, Relaxed) % n;
            for i in (first..n).chain(0..first) {
                if let Some(len) = sys::recv_now(self.queues[i].as_fd(), buf)? {
                    return Ok(len);
                }
            }
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(io::ErrorKind::WouldBlock.into()),
                },
            };
            let fds: [BorrowedFd<'_>; sys::POLL_MAX] =
                std::array::from_fn(|i| self.queues[i.min(n - 1)].as_fd());
            sys::poll(&fds[..n], &mut ready[..n], wait)?;
        }
    }

    /// Another handle on the same end (for a reader thread beside a writer).
    pub fn try_clone(&self) -> io::Result<PacketPipe> {
        use std::sync::atomic::Ordering::Relaxed;
        Ok(PacketPipe {
            queues: self.queues.iter().map(|q| q.try_clone()).collect::<io::Result<_>>()?,
            next_recv: Default::default(),
            read_timeout_ns: self.read_timeout_ns.load(Relaxed).into(),
        })
    }

    /// Makes [`recv`](Self::recv) give up with `WouldBlock` after `timeout`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let ns = timeout.map_or(u64::MAX, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX - 1));
        self.read_timeout_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
        sys::set_recv_timeout(self.queues[0].as_fd(), timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn udp_packet(src_port: u16) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let udp = [(src_port >> 8) as u8, src_port as u8, 0x23, 0x28, 0, 12, 0, 0, 1, 2, 3, 4];
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let n = sitelink_frame::ip::build_ipv4(&mut buf, a, b, 17, &udp).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_multi_queue_pipe_keeps_each_flow_on_one_queue_and_receives_from_all() {
        let (pipe, ends) = PacketPipe::with_queues(3).unwrap();
        assert_eq!(pipe.queues(), 3);
        let mut queue_of_flow = Vec::new();
        let mut buf = [0u8; 128];
        for port in 1000..1016u16 {
            for _ in 0..2 {
                pipe.send(&udp_packet(port)).unwrap();
                let q = (0..3)
                    .find(|&q| matches!(sys::recv_now(ends[q].as_fd(), &mut buf), Ok(Some(_))))
                    .expect("the packet is on some queue");
                queue_of_flow.push((port, q));
            }
        }
        for pair in queue_of_flow.chunks(2) {
            assert_eq!(pair[0].1, pair[1].1, "flow {} moved between queues", pair[0].0);
        }
        let used: std::collections::HashSet<usize> = queue_of_flow.iter().map(|(_, q)| *q).collect();
        assert!(used.len() > 1, "16 flows all on one queue");

        // The link may write on any queue; the application receives from every one.
        for (q, end) in ends.iter().enumerate() {
            sys::write(end.as_fd(), &[q as u8; 5]).unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let n = pipe.recv(&mut buf).unwrap();
            assert_eq!(n, 5);
            seen.push(buf[0]);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2]);
        pipe.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = pipe.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(PacketPipe::with_queues(0).is_err() && PacketPipe::with_queues(65).is_err());
    }
}
