//! Provided buffer rings: pooled buffers lent to the kernel by buffer id, for the multishot
//! receives and reads to fill. Kept by hand: no crate does this with pooled buffers.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::mem::size_of;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use sitelink_frame::{BufPool, PacketBuf};

/// The page size, which the buffer ring must be aligned to.
fn page_size() -> usize {
    // SAFETY: sysconf has no memory preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

/// The provided buffer ring's entries, page-aligned as the kernel requires.
pub(super) struct BufRing {
    base: *mut BufRingEntry,
    entries: u16,
    layout: Layout,
    tail: u16,
    /// Set when the memory must outlive us (the kernel may still read it): never freed.
    leaked: bool,
}

impl BufRing {
    fn new(entries: u16) -> io::Result<BufRing> {
        // The kernel masks ring indices with `entries - 1`, and so does `push`.
        if !entries.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring entries must be a power of two",
            ));
        }
        let layout = Layout::from_size_align(entries as usize * size_of::<BufRingEntry>(), page_size())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size (entries > 0).
        let base = unsafe { alloc_zeroed(layout) }.cast::<BufRingEntry>();
        if base.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(BufRing { base, entries, layout, tail: 0, leaked: false })
    }

    /// Writes an entry at the tail (not yet visible to the kernel: see [`publish`]). The
    /// caller lends at most `entries` buffers at once ([`Provided`] has `entries` ids and
    /// pushes only an id it holds), so fewer than `entries` entries are in the kernel's window
    /// whenever one is pushed.
    fn push(&mut self, addr: *mut u8, len: usize, bid: u16) {
        let index = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `index < entries`, so the entry lies inside the allocation. The kernel only
        // reads entries between its head and the published tail; that window holds the ids
        // lent and not yet consumed, and `bid` is not among them (Provided pushes only ids it
        // got back), so it holds fewer than `entries` entries and the one at the tail is
        // outside it.
        let entry = unsafe { &mut *self.base.add(index) };
        entry.set_addr(addr as u64);
        entry.set_len(len.min(u32::MAX as usize) as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries pushed so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: `base` is the ring's first entry, page-aligned and initialised; the tail field
        // it points at is a u16 the kernel reads atomically, so an atomic release store is the
        // documented way to publish.
        unsafe {
            let tail = BufRingEntry::tail(self.base).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: allocated in `new` with this layout; the ring (the only other user) is gone
        // and drained (else `leaked` is set).
        unsafe { dealloc(self.base.cast(), self.layout) }
    }
}

/// Pooled buffers lent to the kernel through a buffer ring, by buffer id.
pub(super) struct Provided {
    ring: BufRing,
    pub(super) bgid: u16,
    /// Each buffer is offered this many bytes before its usual data offset (room for what the
    /// kernel writes ahead of the payload).
    prefix: usize,
    /// Bytes at the end of each buffer not offered (tailroom kept for padding and tag).
    keep_tail: usize,
    bufs: Vec<Option<PacketBuf>>,
    to_provide: Vec<u16>,
}

impl Provided {
    pub(super) fn new(entries: u16, bgid: u16, prefix: usize, keep_tail: usize) -> io::Result<Provided> {
        Ok(Provided {
            ring: BufRing::new(entries)?,
            bgid,
            prefix,
            keep_tail,
            bufs: (0..entries).map(|_| None).collect(),
            to_provide: (0..entries).collect(),
        })
    }

    /// Lends a fresh pool buffer for every consumed id; with `fixed`, only the pool's free
    /// buffers (it never allocates, and ids wait for buffers to come back).
    pub(super) fn refill(&mut self, pool: &mut BufPool, fixed: bool) -> io::Result<()> {
        let mut pushed = false;
        while let Some(bid) = self.to_provide.pop() {
            let mut buf = if fixed {
                match pool.try_get() {
                    Some(buf) => buf,
                    None => {
                        self.to_provide.push(bid);
                        break;
                    }
                }
            } else {
                pool.get()
            };
            if buf.headroom() < self.prefix {
                pool.put(buf);
                self.to_provide.push(bid);
                return Err(io::Error::other("pool buffers lack headroom for io_uring receives"));
            }
            buf.reset(buf.headroom() - self.prefix);
            let spare = buf.spare_mut();
            let len = spare.len().saturating_sub(self.keep_tail);
            self.ring.push(spare.as_mut_ptr(), len, bid);
            self.bufs[bid as usize] = Some(buf);
            pushed = true;
        }
        if pushed {
            self.ring.publish();
        }
        Ok(())
    }

    /// Takes back the buffer the kernel filled; its id is queued for a fresh one.
    pub(super) fn take(&mut self, bid: u16) -> Option<PacketBuf> {
        let buf = self.bufs.get_mut(bid as usize)?.take()?;
        self.to_provide.push(bid);
        Some(buf)
    }

    /// How many buffers the ring holds.
    pub(super) fn entries(&self) -> u16 {
        self.ring.entries
    }

    /// The address of the ring's entries, to register with the kernel.
    pub(super) fn ring_addr(&self) -> u64 {
        self.ring.base as u64
    }

    /// Gives up the ring and every buffer lent, never to be freed: the kernel may still write
    /// into them (see `Ring`'s `Drop`).
    pub(super) fn leak(&mut self) {
        self.ring.leaked = true;
        std::mem::forget(std::mem::take(&mut self.bufs));
    }
}
