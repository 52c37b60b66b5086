//! Every system call and kernel structure sitelink uses, in one place.
//!
//! Each `unsafe` block says why it is sound. Functions here take and return safe types
//! (`OwnedFd`, slices, `SocketAddr`) so that the rest of the crate holds no `unsafe`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

mod bufmut;
mod bufring;
#[cfg(feature = "testing")]
pub(crate) mod counting;
mod msgs;
pub(crate) mod ring;

pub(crate) use msgs::{GSO_CMSG_SPACE, GSO_MAX_SEGMENTS, MsgBatch, SendGroup, set_gso_segment};

/// Turns a `-1` return into the thread's errno.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

// ---- TUN ---------------------------------------------------------------------------------

/// `struct ifreq` as the kernel lays it out: a 16-byte name, then a 24-byte union of which we
/// use the `short` flags and the `int` MTU at its start.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }

    /// `ifr_flags`: a `short` at the start of the union (two bytes, in native order).
    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Opens `/dev/net/tun` and attaches it to the TUN interface `name` (created if missing), as
/// `IFF_TUN | IFF_NO_PI`, with `IFF_MULTI_QUEUE` and `IFF_VNET_HDR` when asked. Returns the
/// descriptor and the interface's name as the kernel has it.
pub(crate) fn tun_open(name: &str, multi_queue: bool, vnet_hdr: bool) -> io::Result<(OwnedFd, String)> {
    let fd = OwnedFd::from(std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?);
    let mut req = IfReq::new(name)?;
    let mut flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
    }
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR as libc::c_short;
    }
    req.set_flags(flags);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (repr(C), 40 bytes).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) })?;
    Ok((fd, req.name()))
}

/// What `TUNGETIFF` tells of an open TUN descriptor (such as one handed over by a parent
/// process).
pub(crate) struct TunInfo {
    pub(crate) name: String,
    pub(crate) multi_queue: bool,
    pub(crate) vnet_hdr: bool,
}

/// The interface name of an open TUN descriptor and the flags it was attached with.
pub(crate) fn tun_info(fd: BorrowedFd<'_>) -> io::Result<TunInfo> {
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; the descriptor is borrowed live.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF as _, &mut req as *mut IfReq) })?;
    let flags = req.flags();
    Ok(TunInfo {
        name: req.name(),
        multi_queue: flags & libc::IFF_MULTI_QUEUE as libc::c_short != 0,
        vnet_hdr: flags & libc::IFF_VNET_HDR as libc::c_short != 0,
    })
}

/// `TUNSETOFFLOAD`: tells the kernel which offloads (`TUN_F_*`) this side handles, so that it
/// may hand over super-packets and partial checksums. The flags are per device.
pub(crate) fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    if crate::faults::refused(crate::faults::Fault::TunOffload)
        || (flags & (libc::TUN_F_USO4 | libc::TUN_F_USO6) != 0
            && crate::faults::refused(crate::faults::Fault::Uso))
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int); no memory is passed.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags as libc::c_ulong) })?;
    Ok(())
}

/// Receives one datagram into `buf` if one is queued, without blocking: `Ok(None)` if none.
pub(crate) fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match rustix::net::recv(fd, buf, rustix::net::RecvFlags::DONTWAIT) {
        Ok((n, _)) => Ok(Some(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn ifreq_ioctl(name: &str, request: libc::c_ulong, fill: impl FnOnce(&mut IfReq)) -> io::Result<IfReq> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut req = IfReq::new(name)?;
    fill(&mut req);
    // SAFETY: the SIOC[GS]IF* requests used here read and write one `struct ifreq`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut req as *mut IfReq) })?;
    Ok(req)
}

/// `ifr_mtu`: an `int` at the start of the union.
fn ifreq_int(req: &IfReq) -> libc::c_int {
    libc::c_int::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]])
}

/// Sets the MTU of interface `name`.
pub(crate) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mtu = libc::c_int::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ifreq_ioctl(name, libc::SIOCSIFMTU, |r| r.data[..4].copy_from_slice(&mtu.to_ne_bytes())).map(|_| ())
}

/// The MTU of interface `name`.
pub(crate) fn mtu(name: &str) -> io::Result<u32> {
    ifreq_ioctl(name, libc::SIOCGIFMTU, |_| {}).map(|r| ifreq_int(&r) as u32)
}

/// Brings interface `name` up. The flags are a `short` (`ifr_flags`), read and written as
/// one, so this holds on big-endian hosts too.
pub(crate) fn set_up(name: &str) -> io::Result<()> {
    let flags = ifreq_ioctl(name, libc::SIOCGIFFLAGS, |_| {})?.flags();
    ifreq_ioctl(name, libc::SIOCSIFFLAGS, |r| r.set_flags(flags | libc::IFF_UP as libc::c_short)).map(|_| ())
}

// ---- Descriptors -------------------------------------------------------------------------

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, on)?)
}

/// Takes ownership of a descriptor number handed over by a parent process (WG_TUN_FD,
/// WG_UAPI_FD), after checking that it is open.
///
/// # Safety
/// `fd` must be open and owned by no one else in this process (an inherited descriptor
/// nothing else has wrapped): the returned `OwnedFd` closes it when dropped.
pub(crate) unsafe fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD has no memory effects; it only tells whether `fd` is open.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the caller promises `fd` is owned by no one else (this function's contract).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of descriptor `fd` inherited from a parent process, after checking that it
/// is open. See [`take_inherited_fd`](crate::take_inherited_fd) for the safe way to take one named by an environment
/// variable.
///
/// # Safety
/// `fd` must be open and owned by nothing else in this process: the returned `OwnedFd`
/// closes it.
///
/// ```compile_fail
/// // Not callable from safe code: any number could be turned into an owner (a double close).
/// let _ = sitelink_io::adopt_inherited_fd(3);
/// ```
pub unsafe fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller upholds `adopt_fd`'s contract, which is this function's.
    unsafe { adopt_fd(fd) }
}

/// Takes the descriptor number `value`, handed over in environment variable `var`, once per
/// variable and process: the registry of variables taken makes a second take an error, so
/// this safe function cannot create two owners of one inherited descriptor.
pub(crate) fn take_numbered_fd(var: &str, value: &str) -> io::Result<OwnedFd> {
    static TAKEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{var}={value:?}: {why}"));
    let fd: RawFd = value.trim().parse().map_err(|_| invalid("not a descriptor number"))?;
    if fd < 0 {
        return Err(invalid("not a descriptor number"));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if taken.iter().any(|v| v == var) {
        return Err(invalid("already taken"));
    }
    // SAFETY: the variable names a descriptor the parent handed to this process for this use,
    // and it is taken once (the registry above); no safe code can set the variable later.
    let owned = unsafe { adopt_fd(fd) }?;
    taken.push(var.to_owned());
    Ok(owned)
}

/// One `read(2)` into `buf`.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

/// One `write(2)` of `buf`.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::io::write(fd, buf)?)
}

/// One `writev(2)` of `bufs`, gathered into one packet.
pub(crate) fn writev(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    Ok(rustix::io::writev(fd, bufs)?)
}

/// A non-blocking `eventfd`, used to wake a worker blocked in a wait.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    use rustix::event::EventfdFlags;
    Ok(rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// Adds one to an eventfd's counter.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    // An error here means the counter is saturated, which still wakes the reader.
    let _ = write(fd, &1u64.to_ne_bytes());
}

/// Resets an eventfd's counter (non-blocking).
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    let _ = read(fd, &mut b);
}

/// The most descriptors [`poll`] takes.
pub(crate) const POLL_MAX: usize = 64;

/// Waits up to `timeout` for any of `fds` to be readable; sets `readable` to which are.
pub(crate) fn poll(
    fds: &[BorrowedFd<'_>],
    readable: &mut [bool],
    timeout: Option<Duration>,
) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    assert!(fds.len() <= POLL_MAX && readable.len() == fds.len(), "poll: at most {POLL_MAX} descriptors");
    let Some(last) = fds.len().checked_sub(1) else { return Ok(()) };
    // On the stack (this runs per packet in an embedded link's receive): unused slots repeat
    // the last descriptor and are not passed.
    let mut pfds: [PollFd<'_>; POLL_MAX] =
        std::array::from_fn(|i| PollFd::new(&fds[i.min(last)], PollFlags::IN));
    let pfds = &mut pfds[..fds.len()];
    let timeout = timeout.map(timespec);
    match rustix::event::poll(pfds, timeout.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    for (r, p) in readable.iter_mut().zip(pfds.iter()) {
        *r = p.revents().intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP);
    }
    Ok(())
}

/// A new epoll instance.
pub(crate) fn epoll_new() -> io::Result<OwnedFd> {
    Ok(rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)?)
}

/// Registers `fd` with `epoll` for readability (level-triggered), reported with `data`.
pub(crate) fn epoll_add(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
    use rustix::event::epoll;
    Ok(epoll::add(epoll, fd, epoll::EventData::new_u64(data), epoll::EventFlags::IN)?)
}

/// An empty epoll event, to size the buffer [`epoll_wait`] fills.
pub(crate) fn epoll_event() -> EpollEvent {
    use rustix::event::epoll;
    EpollEvent { flags: epoll::EventFlags::empty(), data: epoll::EventData::new_u64(0) }
}

/// One event `epoll_wait` reported.
pub(crate) type EpollEvent = rustix::event::epoll::Event;

/// Waits up to `timeout` (`None`: without limit) for registered descriptors to be ready;
/// returns how many events it wrote at the front of `events` (0 on a timeout or a signal).
pub(crate) fn epoll_wait(
    epoll: BorrowedFd<'_>,
    events: &mut [EpollEvent],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let timeout = timeout.map(timespec);
    match rustix::event::epoll::wait(epoll, events, timeout.as_ref()) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::INTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A timeout as the kernel takes it, at most a minute.
fn timespec(d: Duration) -> rustix::event::Timespec {
    let d = d.min(Duration::from_secs(60));
    rustix::event::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos().into() }
}

// ---- Sockets -----------------------------------------------------------------------------

fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes; the kernel writes at most `len` bytes.
    check(unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
    })?;
    Ok(value)
}

/// A socket address in the kernel's form, big enough for IPv6.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    storage: libc::sockaddr_in6,
    len: libc::socklen_t,
}

impl RawAddr {
    /// `addr` as the kernel wants it on a socket of family `ipv6` (dual-stack sockets take
    /// IPv4 addresses as v4-mapped IPv6).
    pub(crate) fn new(addr: SocketAddr, ipv6_socket: bool) -> Self {
        // SAFETY: sockaddr_in6 is plain old data; all zeros is a valid value.
        let mut storage: libc::sockaddr_in6 = unsafe { zeroed() };
        match (addr, ipv6_socket) {
            (SocketAddr::V4(a), false) => {
                // SAFETY: sockaddr_in is smaller than sockaddr_in6 and both are plain old data
                // with compatible alignment, so writing one into the other's storage is sound.
                let sin =
                    unsafe { &mut *(&mut storage as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                RawAddr { storage, len: size_of::<libc::sockaddr_in>() as libc::socklen_t }
            }
            (addr, _) => {
                let (ip, port, flow, scope) = match addr {
                    SocketAddr::V4(a) => (a.ip().to_ipv6_mapped(), a.port(), 0, 0),
                    SocketAddr::V6(a) => (*a.ip(), a.port(), a.flowinfo(), a.scope_id()),
                };
                storage.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                storage.sin6_port = port.to_be();
                storage.sin6_addr.s6_addr = ip.octets();
                storage.sin6_flowinfo = flow;
                storage.sin6_scope_id = scope;
                RawAddr { storage, len: size_of::<libc::sockaddr_in6>() as libc::socklen_t }
            }
        }
    }

    fn empty() -> Self {
        // SAFETY: sockaddr_in6 is plain old data; all zeros is a valid value.
        RawAddr { storage: unsafe { zeroed() }, len: size_of::<libc::sockaddr_in6>() as libc::socklen_t }
    }

    /// The address, with v4-mapped IPv6 turned back into IPv4.
    pub(crate) fn socket_addr(&self) -> Option<SocketAddr> {
        match i32::from(self.storage.sin6_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into this storage,
                // which is large enough and suitably aligned for it.
                let sin =
                    unsafe { &*(&self.storage as *const libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => {
                let ip = Ipv6Addr::from(self.storage.sin6_addr.s6_addr);
                let port = u16::from_be(self.storage.sin6_port);
                Some(match ip.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                    None => SocketAddr::V6(SocketAddrV6::new(
                        ip,
                        port,
                        self.storage.sin6_flowinfo,
                        self.storage.sin6_scope_id,
                    )),
                })
            }
            _ => None,
        }
    }
}

/// Options for [`udp_bind`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpOptions {
    pub(crate) port: u16,
    pub(crate) fwmark: u32,
    pub(crate) buffer_bytes: u32,
    pub(crate) reuse_port: bool,
    /// `UDP_GRO` on (set by [`set_udp_gro`] on the first socket, copied to its siblings).
    pub(crate) gro: bool,
}

/// A UDP socket bound to `port` on every address: dual-stack IPv6 where the kernel allows it,
/// else IPv4 only. Returns the socket and whether it is IPv6.
pub(crate) fn udp_bind(opts: UdpOptions, loopback_only: bool) -> io::Result<(OwnedFd, bool)> {
    if loopback_only {
        // A socket bound to ::1 cannot reach 127.0.0.1, even v4-mapped: loopback is IPv4.
        return udp_bind_family(opts, false, true, false).map(|fd| (fd, false));
    }
    match udp_bind_family(opts, true, loopback_only, false) {
        Ok(fd) => Ok((fd, true)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)) => {
            udp_bind_family(opts, false, loopback_only, false).map(|fd| (fd, false))
        }
        Err(e) => Err(e),
    }
}

/// A socket of one family bound as `opts` says; an IPv6 one is dual-stack unless `v6only`.
fn udp_bind_family(opts: UdpOptions, ipv6: bool, loopback_only: bool, v6only: bool) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(if ipv6 { Domain::IPV6 } else { Domain::IPV4 }, Type::DGRAM, None)?;
    if ipv6 {
        socket.set_only_v6(v6only)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if opts.fwmark != 0 {
        socket.set_mark(opts.fwmark)?;
    }
    let size = opts.buffer_bytes.min(i32::MAX as u32) as usize;
    if size > 0 {
        // The FORCE variants pass the sysctl limits when we hold CAP_NET_ADMIN; otherwise the
        // plain ones give what the limits allow.
        use rustix::net::sockopt;
        if sockopt::set_socket_recv_buffer_size_force(&socket, size).is_err() {
            let _ = socket.set_recv_buffer_size(size);
        }
        if sockopt::set_socket_send_buffer_size_force(&socket, size).is_err() {
            let _ = socket.set_send_buffer_size(size);
        }
    }
    let ip: std::net::IpAddr = match (ipv6, loopback_only) {
        (true, _) => Ipv6Addr::UNSPECIFIED.into(),
        (false, false) => Ipv4Addr::UNSPECIFIED.into(),
        (false, true) => Ipv4Addr::LOCALHOST.into(),
    };
    socket.bind(&SocketAddr::new(ip, opts.port).into())?;
    Ok(socket.into())
}

/// A socket bound as `opts` says (its port, `SO_REUSEPORT`, buffers, mark) and connected to
/// `peer`: IPv4 for an IPv4 peer, IPv6-only for an IPv6 one, so that the kernel files it
/// under the peer's own family for early demultiplexing.
pub(crate) fn udp_connected(opts: UdpOptions, loopback_only: bool, peer: SocketAddr) -> io::Result<OwnedFd> {
    let v6 = peer.is_ipv6();
    if v6 && loopback_only {
        // Loopback is IPv4 here; an IPv6 socket would listen beyond it.
        return Err(io::Error::new(io::ErrorKind::Unsupported, "an IPv6 peer on a loopback-only link"));
    }
    let fd = udp_bind_family(UdpOptions { reuse_port: true, ..opts }, v6, loopback_only, v6)?;
    if opts.gro {
        // Its datagrams go to the same large buffers as the first socket's: a sibling that
        // refuses GRO still works, one datagram a buffer.
        let _ = set_udp_gro(std::os::fd::AsFd::as_fd(&fd));
    }
    socket2::SockRef::from(&fd).connect(&peer.into())?;
    Ok(fd)
}

/// Sets `SO_RCVTIMEO` (`None` blocks forever).
pub(crate) fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Recv, timeout)?)
}

/// The local port a socket is bound to.
pub(crate) fn local_port(fd: BorrowedFd<'_>) -> io::Result<u16> {
    let addr = socket2::SockRef::from(&fd).local_addr()?;
    addr.as_socket().map(|a| a.port()).ok_or_else(|| io::Error::other("unknown address family"))
}

/// Sets `SO_MARK` on a socket.
pub(crate) fn set_fwmark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_mark(mark)
}

/// The receive buffer size the kernel gave a socket.
pub(crate) fn recv_buffer_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    socket2::SockRef::from(&fd).recv_buffer_size()
}

/// Sets `UDP_GRO` on a socket: from now on a receive may bring a run of datagrams, with their
/// size in a control message (which every receive on it must then ask for and read). Also asks
/// for each datagram's arrival time (`SO_TIMESTAMPNS`, best effort: without it, no stamps),
/// which the receives that read GRO's control messages read too (`aqm.rs`).
pub(crate) fn set_udp_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    if crate::faults::refused(crate::Fault::UdpGro) {
        return Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT));
    }
    set_int_option(fd, libc::SOL_UDP, crate::gro::UDP_GRO, 1)?;
    if let Err(e) = set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1) {
        tracing::debug!(error = %e, "no receive timestamps: the receive queue's delay is not watched");
    }
    Ok(())
}

/// `setsockopt` of an `int` option.
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Nanoseconds of the realtime clock: the clock of the kernel's receive timestamps.
pub(crate) fn realtime_ns() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether the kernel accepts `UDP_SEGMENT` (GSO) on this socket.
pub(crate) fn probe_udp_gso(fd: BorrowedFd<'_>) -> bool {
    getsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

// ---- Process -----------------------------------------------------------------------------

/// Sets the calling thread's scheduling attributes (`sched_setattr`) to `attr`.
pub(crate) fn set_thread_sched_attr(attr: &libc::sched_attr) -> io::Result<()> {
    let mut attr = *attr;
    attr.size = size_of::<libc::sched_attr>() as u32;
    // SAFETY: sched_setattr reads one `struct sched_attr` of the size given in its first
    // field, from a live local; pid 0 is the calling thread.
    check(unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const libc::sched_attr, 0) }
        as libc::c_int)?;
    Ok(())
}

/// The calling thread's scheduling attributes (`sched_getattr`).
pub(crate) fn thread_sched_attr() -> io::Result<libc::sched_attr> {
    let mut attr = libc::sched_attr {
        size: 0,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    let size = size_of::<libc::sched_attr>() as libc::c_uint;
    // SAFETY: sched_getattr writes at most `size` bytes, the size of the live local it is
    // given; pid 0 is the calling thread, flags must be 0.
    check(unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut libc::sched_attr, size, 0) }
        as libc::c_int)?;
    Ok(attr)
}

/// Whether the process runs with an effective uid of 0.
pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn an_inherited_descriptor_is_taken_once() {
        // A descriptor nothing owns, as one inherited from a parent would be.
        let (reader, _writer) = std::io::pipe().unwrap();
        let fd = reader.into_raw_fd();
        let var = "SITELINK_TEST_ADOPT_ONCE";
        let owned = take_numbered_fd(var, &fd.to_string()).unwrap();
        assert_eq!(owned.as_raw_fd(), fd);
        let again = take_numbered_fd(var, &fd.to_string()).unwrap_err();
        assert!(again.to_string().contains("already taken"), "{again}");
        drop(owned);
        assert!(take_numbered_fd("SITELINK_TEST_ADOPT_BAD", "x").is_err());
        assert!(take_numbered_fd("SITELINK_TEST_ADOPT_NEG", "-1").is_err());
    }
}
