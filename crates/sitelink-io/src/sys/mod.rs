//! Every system call and kernel structure sitelink uses, in one place.
//!
//! Each `unsafe` block says why it is sound. Functions here take and return safe types
//! (`OwnedFd`, slices, `SocketAddr`) so that the rest of the crate holds no `unsafe`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sitelink_frame::{Datagram, PacketBuf};

mod bufring;
#[cfg(feature = "testing")]
pub(crate) mod counting;
pub(crate) mod ring;

/// Turns a `-1` return into the thread's errno.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Like [`check`] for calls returning `ssize_t`.
fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
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
/// `IFF_TUN | IFF_NO_PI`, with `IFF_MULTI_QUEUE` when asked. Returns the descriptor and the
/// interface's name as the kernel has it.
pub(crate) fn tun_open(name: &str, multi_queue: bool) -> io::Result<(OwnedFd, String)> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
    let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name)?;
    let mut flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
    }
    req.set_flags(flags);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (repr(C), 40 bytes).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) })?;
    Ok((fd, req.name()))
}

/// The interface name of an open TUN descriptor (one handed over by a parent process), and
/// whether it was attached with `IFF_MULTI_QUEUE`.
pub(crate) fn tun_info(fd: BorrowedFd<'_>) -> io::Result<(String, bool)> {
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; the descriptor is borrowed live.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF as _, &mut req as *mut IfReq) })?;
    Ok((req.name(), req.flags() & libc::IFF_MULTI_QUEUE as libc::c_short != 0))
}

/// Receives one datagram into `buf` if one is queued, without blocking: `Ok(None)` if none.
pub(crate) fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call's duration.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    match check_size(r) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs one `SIOC[GS]IF*` request on interface `name`: `fill` sets the request's fields,
/// and the kernel's answer comes back in the returned `ifreq`.
fn ifreq_ioctl(name: &str, request: libc::c_ulong, fill: impl FnOnce(&mut IfReq)) -> io::Result<IfReq> {
    // SAFETY: socket has no memory preconditions.
    let sock = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `sock` was just returned by socket and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
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
    // SAFETY: F_GETFL takes no argument and the descriptor is borrowed live.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
    // SAFETY: F_SETFL takes an int argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) })?;
    Ok(())
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

/// Adopting inherited descriptors: `unsafe`, so it lives here; the safe way in is
/// [`crate::take_inherited_fd`].
impl crate::Tun {
    /// Takes the descriptor number `fd`, inherited from a parent process. A program handed
    /// the descriptor in an environment variable can use [`take_inherited_fd`](crate::take_inherited_fd) and
    /// [`from_fd`](crate::Tun::from_fd) instead, without `unsafe`.
    ///
    /// # Safety
    /// `fd` must be open and owned by nothing else in this process: the `Tun` closes it.
    ///
    /// ```compile_fail
    /// // Not callable from safe code: any number could be turned into an owner (a double close).
    /// let _ = sitelink_io::Tun::from_raw_inherited(3);
    /// ```
    pub unsafe fn from_raw_inherited(fd: RawFd) -> io::Result<crate::Tun> {
        // SAFETY: the caller upholds `adopt_fd`'s contract, which is this function's.
        crate::Tun::from_fd(unsafe { adopt_fd(fd) }?)
    }
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
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call's duration.
    check_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// One `write(2)` of `buf`.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call's duration.
    check_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// A non-blocking `eventfd`, used to wake a worker blocked in `poll`.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
    const MAX: usize = POLL_MAX;
    assert!(fds.len() <= MAX && readable.len() == fds.len(), "poll: at most {MAX} descriptors");
    let mut pfds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; MAX];
    for (p, fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd.as_raw_fd();
        p.events = libc::POLLIN;
    }
    let ms = poll_timeout_ms(timeout);
    // SAFETY: `pfds` holds `fds.len()` initialised pollfd structs, valid for the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    match check(r) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    for (r, p) in readable.iter_mut().zip(&pfds) {
        *r = p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    }
    Ok(())
}

/// A new epoll instance.
pub(crate) fn epoll_new() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers; the descriptor it returns is ours alone.
    let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers `fd` with `epoll` for readability (level-triggered), reported with `data`.
pub(crate) fn epoll_add(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
    // SAFETY: both descriptors are borrowed live; `event` is initialised and read during the
    // call only.
    check(unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) })?;
    Ok(())
}

/// Waits up to `timeout` (`None`: without limit) for registered descriptors to be ready;
/// returns how many events it wrote at the front of `events` (0 on a timeout or a signal).
pub(crate) fn epoll_wait(
    epoll: BorrowedFd<'_>,
    events: &mut [libc::epoll_event],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let ms = poll_timeout_ms(timeout);
    let max = events.len().min(i32::MAX as usize) as i32;
    // SAFETY: `events` has room for `max` events, written by the kernel during the call only.
    let r = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), max, ms) };
    match check(r) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// A timeout in whole milliseconds for `poll`/`epoll_wait`, rounded up (a wait never ends
/// early), at most a minute; -1 without one.
fn poll_timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(d) => {
            d.as_millis().saturating_add(u128::from(d.subsec_nanos() % 1_000_000 != 0)).min(60_000) as i32
        }
    }
}

// ---- Sockets -----------------------------------------------------------------------------

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is one c_int, passed with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

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
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket has no memory preconditions.
    let fd = check(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let b = fd.as_fd_borrow();
    if ipv6 {
        setsockopt_int(b, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, libc::c_int::from(v6only))?;
    }
    if opts.reuse_port {
        setsockopt_int(b, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    if opts.fwmark != 0 {
        setsockopt_int(b, libc::SOL_SOCKET, libc::SO_MARK, opts.fwmark as libc::c_int)?;
    }
    let size = opts.buffer_bytes.min(i32::MAX as u32) as libc::c_int;
    if size > 0 {
        // The FORCE variants pass the sysctl limits when we hold CAP_NET_ADMIN; otherwise the
        // plain ones give what the limits allow.
        for (force, plain) in
            [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)]
        {
            if setsockopt_int(b, libc::SOL_SOCKET, force, size).is_err() {
                let _ = setsockopt_int(b, libc::SOL_SOCKET, plain, size);
            }
        }
    }
    let ip: std::net::IpAddr = match (ipv6, loopback_only) {
        (true, _) => Ipv6Addr::UNSPECIFIED.into(),
        (false, false) => Ipv4Addr::UNSPECIFIED.into(),
        (false, true) => Ipv4Addr::LOCALHOST.into(),
    };
    let addr = RawAddr::new(SocketAddr::new(ip, opts.port), ipv6);
    // SAFETY: `addr.storage` holds a socket address of `addr.len` bytes.
    check(unsafe {
        libc::bind(fd.as_raw_fd(), (&addr.storage as *const libc::sockaddr_in6).cast(), addr.len)
    })?;
    Ok(fd)
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
    let addr = RawAddr::new(peer, v6);
    // SAFETY: `addr.storage` holds a socket address of `addr.len` bytes.
    check(unsafe {
        libc::connect(fd.as_raw_fd(), (&addr.storage as *const libc::sockaddr_in6).cast(), addr.len)
    })?;
    Ok(fd)
}

/// Sets `SO_RCVTIMEO` (`None` blocks forever).
pub(crate) fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let d = timeout.unwrap_or(Duration::ZERO);
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value is one timeval, passed with its exact size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// The local port a socket is bound to.
pub(crate) fn local_port(fd: BorrowedFd<'_>) -> io::Result<u16> {
    let mut addr = RawAddr::empty();
    // SAFETY: `addr.storage` is valid for writes of `addr.len` bytes; the kernel updates `len`.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr.storage as *mut libc::sockaddr_in6).cast(),
            &mut addr.len,
        )
    })?;
    addr.socket_addr().map(|a| a.port()).ok_or_else(|| io::Error::other("unknown address family"))
}

/// Sets `SO_MARK` on a socket.
pub(crate) fn set_fwmark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// The receive buffer size the kernel gave a socket.
pub(crate) fn recv_buffer_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map(|v| v as usize)
}

/// Whether the kernel accepts `UDP_SEGMENT` (GSO) on this socket.
pub(crate) fn probe_udp_gso(fd: BorrowedFd<'_>) -> bool {
    getsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

// ---- recvmmsg / sendmmsg ------------------------------------------------------------------

/// Room for one `UDP_SEGMENT` control message.
const GSO_CMSG_SPACE: usize = 32;

/// Reusable kernel structures for one batch of `recvmmsg`/`sendmmsg`, so that a batch
/// allocates nothing. The pointers inside are refreshed before every call.
pub(crate) struct MsgBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<RawAddr>,
    cmsgs: Vec<[u64; GSO_CMSG_SPACE / 8]>,
}

// SAFETY: the raw pointers inside point into this struct's own vectors or into buffers that
// are only borrowed during a call; no pointer outlives the call that set it.
unsafe impl Send for MsgBatch {}

impl MsgBatch {
    /// Structures for batches of up to `n` messages holding up to `n` datagrams in all.
    pub(crate) fn new(n: usize) -> Self {
        // SAFETY: mmsghdr is plain old data; all zeros (null pointers, zero lengths) is valid.
        let hdr: libc::mmsghdr = unsafe { zeroed() };
        MsgBatch {
            hdrs: vec![hdr; n],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            addrs: vec![RawAddr::empty(); n],
            cmsgs: vec![[0u64; GSO_CMSG_SPACE / 8]; n],
        }
    }

    /// Receives up to `bufs.len()` datagrams without blocking, each into the spare room of one
    /// of `bufs` (whose length is set). Returns how many arrived; `addrs[i]` tells each one's
    /// source, and `truncated[i]` whether it was larger than its buffer.
    pub(crate) fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &mut [PacketBuf],
        addrs: &mut [Option<SocketAddr>],
        truncated: &mut [bool],
    ) -> io::Result<usize> {
        let n = bufs.len().min(self.hdrs.len()).min(addrs.len()).min(truncated.len());
        for (i, buf) in bufs.iter_mut().enumerate().take(n) {
            let spare = buf.spare_mut();
            self.iovs[i] = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: spare.len() };
            self.addrs[i] = RawAddr::empty();
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i].storage as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = self.addrs[i].len;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: the first `n` headers point at the spare room of `n` live buffers (borrowed
        // mutably for this call) and at address storage inside `self`; the kernel writes
        // within those bounds.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = check(r)? as usize;
        for i in 0..got {
            let h = &self.hdrs[i];
            self.addrs[i].len = h.msg_hdr.msg_namelen;
            truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let len = (h.msg_len as usize).min(bufs[i].spare_mut().len());
            bufs[i].set_len(len).expect("the kernel wrote within the spare room");
            addrs[i] = self.addrs[i].socket_addr();
        }
        Ok(got)
    }

    /// Sends one message per group: group `g` is `dgrams[g.start..g.end]` to the address of
    /// its first datagram, cut by the kernel into datagrams of `g.segment` bytes when that is
    /// non-zero (UDP GSO). Returns how many groups the kernel took. On a connected socket
    /// (`addressed` false) the messages carry no address: the kernel then uses the route it
    /// cached at `connect`.
    pub(crate) fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        ipv6_socket: bool,
        addressed: bool,
        dgrams: &[Datagram],
        groups: &[SendGroup],
    ) -> io::Result<usize> {
        let n = groups.len().min(self.hdrs.len());
        let mut iov = 0;
        for (i, g) in groups.iter().enumerate().take(n) {
            let pieces = &dgrams[g.start..g.end];
            if iov + pieces.len() > self.iovs.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many pieces for the batch"));
            }
            for (slot, d) in self.iovs[iov..].iter_mut().zip(pieces) {
                let data = d.buf.data();
                *slot = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
            }
            let h = &mut self.hdrs[i].msg_hdr;
            if addressed {
                self.addrs[i] = RawAddr::new(pieces[0].addr, ipv6_socket);
                h.msg_name = (&mut self.addrs[i].storage as *mut libc::sockaddr_in6).cast();
                h.msg_namelen = self.addrs[i].len;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            h.msg_iov = &mut self.iovs[iov];
            h.msg_iovlen = pieces.len();
            h.msg_flags = 0;
            iov += pieces.len();
            set_gso_segment(h, &mut self.cmsgs[i], g.segment);
        }
        // SAFETY: the first `n` headers point at iovecs over the borrowed datagrams' bytes, at
        // address storage and control space inside `self`, all live for this call; sendmmsg
        // only reads them.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), self.hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        Ok(check(r)? as usize)
    }
}

/// Points `hdr`'s control data at `space` holding one `UDP_SEGMENT` message of `segment`
/// bytes, or clears it when `segment` is 0 (a single datagram).
pub(crate) fn set_gso_segment(hdr: &mut libc::msghdr, space: &mut [u64; GSO_CMSG_SPACE / 8], segment: u16) {
    if segment == 0 {
        hdr.msg_control = std::ptr::null_mut();
        hdr.msg_controllen = 0;
        return;
    }
    hdr.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    debug_assert!(hdr.msg_controllen <= GSO_CMSG_SPACE);
    // SAFETY: msg_control points at GSO_CMSG_SPACE bytes (8-aligned, borrowed mutably for this
    // call), enough for one cmsghdr carrying a u16, so CMSG_FIRSTHDR is non-null and CMSG_DATA
    // stays inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(hdr);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
}

/// One message of a [`MsgBatch::send`]: datagrams `start..end` of the batch, all to the first
/// one's address; `segment` is the GSO segment size, or 0 for a single datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendGroup {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) segment: u16,
}

/// Small helper so that `OwnedFd` and `BorrowedFd` read alike above.
trait AsFdBorrow {
    fn as_fd_borrow(&self) -> BorrowedFd<'_>;
}

impl AsFdBorrow for OwnedFd {
    fn as_fd_borrow(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

// ---- Process -----------------------------------------------------------------------------

/// Whether the process runs with an effective uid of 0.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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
