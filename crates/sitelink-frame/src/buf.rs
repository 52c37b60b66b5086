//! Packet buffers with head- and tailroom, and a pool that recycles them.

use crate::FrameError;

/// Headroom a fresh buffer keeps before its data: the 16-byte transport header plus room for a
/// 12-byte virtio-net header, rounded up to a cache line so the payload stays aligned.
pub const DEFAULT_HEADROOM: usize = 64;

/// Tailroom a fresh buffer keeps after an MTU-sized payload: up to 15 bytes of padding and the
/// 16-byte AEAD tag on the way out; and 16 bytes more, so that a received message whose
/// plaintext a peer padded up to a multiple of 16 past the MTU (the protocol allows it, and
/// gotatun does it: 1,420 bytes padded to 1,424) still fits whole.
pub const DEFAULT_TAILROOM: usize = 48;

/// One piece of packet memory: `[headroom | data | tailroom]`.
///
/// The data can grow into the headroom ([`prepend`](Self::prepend)) and into the tailroom
/// ([`extend`](Self::extend)) without moving, which is how a plaintext IP packet becomes a
/// WireGuard transport message in place: padding and tag at the tail, header at the head.
pub struct PacketBuf {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
}

impl PacketBuf {
    /// A new buffer of `capacity` bytes in all, empty, with its data starting at `headroom`.
    ///
    /// `headroom` is clamped to `capacity`.
    pub fn new(capacity: usize, headroom: usize) -> Self {
        let headroom = headroom.min(capacity);
        PacketBuf { mem: vec![0u8; capacity].into_boxed_slice(), start: headroom, end: headroom }
    }

    /// A buffer holding a copy of `data`, with the default head- and tailroom.
    ///
    /// Meant for tests and the control path; the data path reads straight into pooled buffers.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = PacketBuf::new(DEFAULT_HEADROOM + data.len() + DEFAULT_TAILROOM, DEFAULT_HEADROOM);
        buf.end = buf.start + data.len();
        buf.mem[buf.start..buf.end].copy_from_slice(data);
        buf
    }

    /// The data.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.mem[self.start..self.end]
    }

    /// The data, writable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.end]
    }

    /// Length of the data.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the data is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Bytes free before the data.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Bytes free after the data.
    #[inline]
    pub fn tailroom(&self) -> usize {
        self.mem.len() - self.end
    }

    /// Total size of the memory.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.mem.len()
    }

    /// Grows the data by `n` bytes at the front and returns those bytes for the caller to fill.
    #[inline]
    pub fn prepend(&mut self, n: usize) -> Result<&mut [u8], FrameError> {
        if n > self.start {
            return Err(FrameError::NoHeadroom { have: self.start, need: n });
        }
        self.start -= n;
        Ok(&mut self.mem[self.start..self.start + n])
    }

    /// Removes `n` bytes from the front of the data (they become headroom).
    #[inline]
    pub fn advance(&mut self, n: usize) -> Result<(), FrameError> {
        if n > self.len() {
            return Err(FrameError::Truncated { len: self.len(), need: n });
        }
        self.start += n;
        Ok(())
    }

    /// Grows the data by `n` bytes at the back and returns those bytes for the caller to fill.
    ///
    /// The new bytes hold whatever the memory held before; callers that need zeros (padding)
    /// write them.
    #[inline]
    pub fn extend(&mut self, n: usize) -> Result<&mut [u8], FrameError> {
        if n > self.tailroom() {
            return Err(FrameError::NoTailroom { have: self.tailroom(), need: n });
        }
        let old = self.end;
        self.end += n;
        Ok(&mut self.mem[old..self.end])
    }

    /// Shortens the data to `len` bytes; does nothing if it is already no longer.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// Empties the buffer and puts the start of the data at `headroom` (clamped to capacity).
    #[inline]
    pub fn reset(&mut self, headroom: usize) {
        self.start = headroom.min(self.mem.len());
        self.end = self.start;
    }

    /// The memory from the start of the data to the end of the buffer: where a read from a
    /// socket or TUN device goes, followed by [`set_len`](Self::set_len).
    #[inline]
    pub fn spare_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..]
    }

    /// The memory after the data: where appending writes go, followed by
    /// [`set_len`](Self::set_len) with the grown length.
    #[inline]
    pub fn after_data_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.end..]
    }

    /// Sets the data length after a read into [`spare_mut`](Self::spare_mut).
    #[inline]
    pub fn set_len(&mut self, len: usize) -> Result<(), FrameError> {
        let room = self.mem.len() - self.start;
        if len > room {
            return Err(FrameError::NoTailroom { have: room, need: len });
        }
        self.end = self.start + len;
        Ok(())
    }

    /// Replaces the data with a copy of `data`, keeping the current start.
    pub fn copy_from(&mut self, data: &[u8]) -> Result<(), FrameError> {
        self.set_len(data.len())?;
        self.data_mut().copy_from_slice(data);
        Ok(())
    }
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("len", &self.len())
            .field("headroom", &self.headroom())
            .field("tailroom", &self.tailroom())
            .finish()
    }
}

/// A UDP datagram with its remote address: the destination of one to send, the source of one
/// received. The buffer is pooled: hand it back to its pool once sent or consumed.
#[derive(Debug)]
pub struct Datagram {
    /// Remote address.
    pub addr: std::net::SocketAddr,
    /// The datagram's bytes.
    pub buf: PacketBuf,
}

/// A free list of [`PacketBuf`]s of one size.
///
/// `get` pops a recycled buffer (allocating only when the list is empty) and `put` pushes one
/// back, so that once warm the data path allocates nothing. The pool is owned by one thread
/// (one per worker); it keeps at most `max_free` buffers and frees the rest.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<PacketBuf>,
    capacity: usize,
    headroom: usize,
    max_free: usize,
    allocated: u64,
}

impl BufPool {
    /// A pool of buffers of `capacity` bytes with data starting at `headroom`, keeping up to
    /// `max_free` free buffers. Nothing is allocated until [`get`](Self::get) or
    /// [`prefill`](Self::prefill).
    pub fn new(capacity: usize, headroom: usize, max_free: usize) -> Self {
        BufPool { free: Vec::with_capacity(max_free), capacity, headroom, max_free, allocated: 0 }
    }

    /// A pool of MTU-sized buffers: `mtu` bytes of payload with the default head- and tailroom.
    pub fn for_mtu(mtu: usize, max_free: usize) -> Self {
        BufPool::new(DEFAULT_HEADROOM + mtu + DEFAULT_TAILROOM, DEFAULT_HEADROOM, max_free)
    }

    /// Allocates `n` buffers into the free list now (at most `max_free` in all).
    pub fn prefill(&mut self, n: usize) {
        while self.free.len() < n.min(self.max_free) {
            self.allocated += 1;
            self.free.push(PacketBuf::new(self.capacity, self.headroom));
        }
    }

    /// An empty buffer with the pool's headroom.
    #[inline]
    pub fn get(&mut self) -> PacketBuf {
        match self.free.pop() {
            Some(buf) => buf,
            None => {
                self.allocated += 1;
                PacketBuf::new(self.capacity, self.headroom)
            }
        }
    }

    /// A free buffer if the pool holds one, never allocating: for memory of a fixed size
    /// (a pool [`prefill`](Self::prefill)ed once) that must not grow.
    #[inline]
    pub fn try_get(&mut self) -> Option<PacketBuf> {
        self.free.pop()
    }

    /// Returns a buffer to the pool. Buffers of another size, or past `max_free`, are freed.
    #[inline]
    pub fn put(&mut self, mut buf: PacketBuf) {
        if self.free.len() < self.max_free && buf.capacity() == self.capacity {
            buf.reset(self.headroom);
            self.free.push(buf);
        }
    }

    /// A new, empty pool of the same buffers (size, headroom, limit), such as one per worker
    /// beside the engine's.
    pub fn clone_empty(&self) -> BufPool {
        BufPool::new(self.capacity, self.headroom, self.max_free)
    }

    /// Moves up to `n` free buffers to `other` (as far as `other` keeps them: see
    /// [`put`](Self::put)); returns how many moved. Pools that pass buffers to each other
    /// (one per worker thread, and the engine's) even out with it, without allocating.
    pub fn give(&mut self, other: &mut BufPool, n: usize) -> usize {
        let n = n.min(self.free.len()).min(other.max_free.saturating_sub(other.free.len()));
        for buf in self.free.drain(self.free.len() - n..) {
            other.put(buf);
        }
        n
    }

    /// Number of free buffers held.
    pub fn free_len(&self) -> usize {
        self.free.len()
    }

    /// Number of buffers this pool has allocated over its life (a warm pool stops counting).
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Size of each buffer.
    pub fn buf_capacity(&self) -> usize {
        self.capacity
    }

    /// Headroom of each fresh buffer.
    pub fn buf_headroom(&self) -> usize {
        self.headroom
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn give_moves_free_buffers_within_the_receivers_limit() {
        let mut a = BufPool::new(128, 16, 10);
        let mut b = BufPool::new(128, 16, 3);
        a.prefill(8);
        assert_eq!(a.give(&mut b, 5), 3, "b keeps at most 3");
        assert_eq!((a.free_len(), b.free_len()), (5, 3));
        assert_eq!(b.give(&mut a, 100), 3);
        assert_eq!((a.free_len(), b.free_len(), b.allocated()), (8, 0, 0));
    }

    #[test]
    fn grows_at_both_ends_in_place() {
        let mut b = PacketBuf::new(100, 20);
        assert!(b.is_empty());
        b.extend(10).unwrap().copy_from_slice(&[7; 10]);
        b.prepend(4).unwrap().copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(b.data(), &[1, 2, 3, 4, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
        assert_eq!(b.headroom(), 16);
        assert_eq!(b.tailroom(), 70);
        b.advance(4).unwrap();
        assert_eq!(b.len(), 10);
        b.truncate(3);
        assert_eq!(b.data(), &[7, 7, 7]);
    }

    #[test]
    fn refuses_to_overrun() {
        let mut b = PacketBuf::new(32, 8);
        assert_eq!(b.prepend(9), Err(FrameError::NoHeadroom { have: 8, need: 9 }));
        assert_eq!(b.extend(25).unwrap_err(), FrameError::NoTailroom { have: 24, need: 25 });
        assert!(b.advance(1).is_err());
        assert!(b.set_len(25).is_err());
        b.set_len(24).unwrap();
        assert_eq!(b.tailroom(), 0);
        let mut c = PacketBuf::new(4, 10);
        assert_eq!(c.headroom(), 4);
        assert_eq!(c.spare_mut().len(), 0);
    }

    #[test]
    fn pool_recycles_without_allocating() {
        let mut pool = BufPool::for_mtu(1420, 8);
        let a = pool.get();
        let mut b = pool.get();
        b.extend(100).unwrap();
        assert_eq!(pool.allocated(), 2);
        pool.put(a);
        pool.put(b);
        let c = pool.get();
        assert!(c.is_empty());
        assert_eq!(c.headroom(), DEFAULT_HEADROOM);
        assert_eq!(pool.allocated(), 2);
        pool.put(PacketBuf::new(10, 0)); // foreign size: dropped, not pooled
        assert_eq!(pool.free_len(), 1);
    }
}
