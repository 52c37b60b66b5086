//! `bytes::BufMut` for [`OutPacket`]: the one unsafe trait the in-process packet side
//! implements, so that applications write packets with the `bytes` API in place.

use bytes::buf::UninitSlice;

use crate::inproc::OutPacket;

// SAFETY: `chunk_mut` hands out the buffer's room after the data, up to the MTU, which is initialised
// memory (a `PacketBuf` is zero-filled when made) that nothing else borrows; `advance_mut`
// extends the packet over bytes of that room only (it panics past it, as the trait allows),
// and `remaining_mut` is exactly that room.
unsafe impl bytes::BufMut for OutPacket {
    fn remaining_mut(&self) -> usize {
        self.room()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.room(), "advance_mut past the packet's room");
        let len = self.buf.len() + cnt;
        self.buf.set_len(len).expect("within the room checked above");
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        UninitSlice::new(self.unwritten_mut())
    }
}
