//! `recvmmsg` and `sendmmsg` over pooled buffers: the message headers, iovecs, addresses and
//! control messages of a batch, reused call after call.

use std::io;
use std::mem::zeroed;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use sitelink_frame::{Datagram, PacketBuf};

use super::{RawAddr, check};

/// Room for one `UDP_SEGMENT` control message.
pub(crate) const GSO_CMSG_SPACE: usize = 32;

/// Room for the control messages of a receive on a socket with `UDP_GRO` and
/// `SO_TIMESTAMPNS`: an `int` (24 bytes with its header) and a `timespec` (32).
const RECV_CMSG_SPACE: usize = 64;

/// The most datagrams one GSO send carries (both backends group by it; the uring send slots
/// are sized for it).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;

/// Reusable kernel structures for one batch of `recvmmsg`/`sendmmsg`, so that a batch
/// allocates nothing. The pointers inside are refreshed before every call.
pub(crate) struct MsgBatch {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    /// The iovecs of a scattered receive (grown to the largest one once).
    scatter_iovs: Vec<libc::iovec>,
    addrs: Vec<RawAddr>,
    cmsgs: Vec<[u64; GSO_CMSG_SPACE / 8]>,
    /// Control space of scattered receives (GRO's segment size, the arrival stamp).
    recv_cmsgs: Vec<[u64; RECV_CMSG_SPACE / 8]>,
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
            scatter_iovs: Vec::new(),
            addrs: vec![RawAddr::empty(); n],
            cmsgs: vec![[0u64; GSO_CMSG_SPACE / 8]; n],
            recv_cmsgs: vec![[0u64; RECV_CMSG_SPACE / 8]; n],
        }
    }

    /// Receives up to `bufs.len()` datagrams without blocking, each into the spare room of one
    /// of `bufs` (whose length is set). Returns how many arrived; `addrs[i]` tells each one's
    /// source, and `truncated[i]` whether it was larger than its buffer. (For sockets without
    /// `UDP_GRO`: no control messages are read.)
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
        // mutably for this call) and at address and control storage inside `self`; the kernel
        // writes within those bounds.
        let got = unsafe { self.recvmmsg(fd, n)? };
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

    /// One `recvmmsg` without blocking over the first `n` headers; returns how many arrived.
    ///
    /// # Safety
    /// Every pointer in those headers (name, iovecs, control) must be valid for the kernel to
    /// write, within the lengths given, until the call returns.
    unsafe fn recvmmsg(&mut self, fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
        // SAFETY: forwarded from this function's contract.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        Ok(check(r)? as usize)
    }

    /// What received message `i`'s control messages say: the `UDP_GRO` segment size (0:
    /// none) and the arrival stamp.
    fn received_control(&self, i: usize) -> crate::gro::Control {
        let control_len = self.hdrs[i].msg_hdr.msg_controllen.min(RECV_CMSG_SPACE);
        let mut control = [0u8; RECV_CMSG_SPACE];
        for (chunk, word) in control.chunks_exact_mut(8).zip(&self.recv_cmsgs[i]) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        crate::gro::Control::parse(&control[..control_len])
    }

    /// Receives up to `slots.len()` messages without blocking, each scattered over its slot's
    /// pieces and then its overflow buffer ([`ScatterSlot`](crate::gro::ScatterSlot), laid out
    /// by `prepare`), with its control messages. Returns how many arrived and fills in each
    /// one's length, source, truncation and `UDP_GRO` segment size.
    pub(crate) fn recv_scattered(
        &mut self,
        fd: BorrowedFd<'_>,
        slots: &mut [crate::gro::ScatterSlot],
    ) -> io::Result<usize> {
        let n = slots.len().min(self.hdrs.len());
        self.scatter_iovs.clear();
        for slot in slots.iter_mut().take(n) {
            let piece = slot.piece;
            for buf in &mut slot.bufs[..slot.pieces] {
                let spare = buf.spare_mut();
                let len = piece.min(spare.len());
                self.scatter_iovs.push(libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: len });
            }
            let overflow = slot.overflow.spare_mut();
            self.scatter_iovs
                .push(libc::iovec { iov_base: overflow.as_mut_ptr().cast(), iov_len: overflow.len() });
        }
        let mut at = 0;
        for (i, slot) in slots.iter().enumerate().take(n) {
            self.addrs[i] = RawAddr::empty();
            self.recv_cmsgs[i] = [0; RECV_CMSG_SPACE / 8];
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i].storage as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = self.addrs[i].len;
            // The vector was filled above and does not change until the call returns.
            h.msg_iov = self.scatter_iovs[at..].as_mut_ptr();
            h.msg_iovlen = slot.pieces + 1;
            h.msg_control = self.recv_cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = RECV_CMSG_SPACE;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
            at += slot.pieces + 1;
        }
        // SAFETY: each of the first `n` headers points at its `pieces + 1` iovecs in
        // `self.scatter_iovs`, each covering spare room of a live buffer the slots hold
        // (borrowed mutably for this call), and at address and control storage inside
        // `self`; the kernel writes within those bounds.
        let got = unsafe { self.recvmmsg(fd, n)? };
        for (i, slot) in slots.iter_mut().enumerate().take(got) {
            let h = &self.hdrs[i];
            self.addrs[i].len = h.msg_hdr.msg_namelen;
            slot.truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            slot.len = (h.msg_len as usize).min(slot.piece * slot.pieces + slot.overflow.capacity());
            slot.addr = self.addrs[i].socket_addr();
            let control = self.received_control(i);
            slot.segment = control.segment;
            slot.stamp = control.stamp;
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
