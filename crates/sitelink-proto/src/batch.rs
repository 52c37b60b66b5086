//! AEAD work taken out of the engine, so that it runs without the engine's lock.
//!
//! The [`Device`](crate::Device) decides everything about a transport message under its
//! `&mut self`: which peer and keypair, which counter, whether the replay window could take
//! it. The sealing and opening themselves (nearly all of the per-packet cost) need only the
//! keypair's key, so the device hands them out as jobs in a [`CryptoBatch`]: each job holds
//! its buffer, an [`Arc`] of its key and its counter. Several workers can then run their
//! batches at once, each on its own core, and come back to the device only to finish the
//! packets they opened ([`Device::complete`](crate::Device::complete): the replay window,
//! roaming, timers and the inner source check).
//!
//! A batch keeps the order of its jobs: datagrams leave [`CryptoBatch::run`] in the order the
//! packets went in, and opened packets are delivered in the order they arrived.
//!
//! Nothing here allocates once the batch's vectors have grown to the largest batch seen: a
//! key is shared by reference count, and one clone serves a run of jobs with the same key.

use std::net::SocketAddr;
use std::sync::Arc;

use sitelink_crypto::TransportKey;
use sitelink_frame::wire::{TRANSPORT_HEADER_LEN, write_transport_header};
use sitelink_frame::{Datagram, PacketBuf};

use crate::peer::PeerId;

/// A packet to seal: everything was decided under the device; only the AEAD is left.
struct SealJob {
    key: u32,
    counter: u64,
    remote_index: u32,
    addr: SocketAddr,
    buf: PacketBuf,
}

/// A transport message to open, and after [`CryptoBatch::run`] the result.
pub(crate) struct OpenJob {
    key: u32,
    pub(crate) counter: u64,
    pub(crate) peer: PeerId,
    pub(crate) local_index: u32,
    /// The whole datagram's length on the wire (for the peer's byte counter).
    pub(crate) wire_len: usize,
    pub(crate) addr: SocketAddr,
    /// The ciphertext (header already stripped); after a successful open, the padded
    /// plaintext.
    pub(crate) buf: PacketBuf,
    /// After [`CryptoBatch::run`]: whether the ciphertext authenticated.
    pub(crate) opened: Option<bool>,
}

/// A set of keys referenced by index from jobs; consecutive jobs under the same key share one
/// entry, so a batch for one peer holds one or two keys.
#[derive(Default)]
struct KeySet(Vec<Arc<TransportKey>>);

impl KeySet {
    #[inline]
    fn slot(&mut self, key: &Arc<TransportKey>) -> u32 {
        if let Some(last) = self.0.last()
            && Arc::ptr_eq(last, key)
        {
            return (self.0.len() - 1) as u32;
        }
        self.0.push(Arc::clone(key));
        (self.0.len() - 1) as u32
    }

    #[inline]
    fn get(&self, slot: u32) -> &TransportKey {
        &self.0[slot as usize]
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Transport messages to seal and to open, handed out by the device and run without it.
///
/// The driving loop, in the order it must go:
/// 1. with the device: [`Device::encapsulate_deferred`](crate::Device::encapsulate_deferred)
///    and [`Device::decapsulate_deferred`](crate::Device::decapsulate_deferred) fill the batch
///    (and push handshake traffic, which needs the device, straight to `out`);
/// 2. without it: [`run`](Self::run) seals and opens everything, moving the sealed datagrams
///    to `out`;
/// 3. with the device again, if [`needs_completion`](Self::needs_completion):
///    [`Device::complete`](crate::Device::complete) delivers the opened packets.
///
/// A batch belongs to one device: jobs hold peer ids and indices that mean nothing elsewhere.
/// One batch per worker thread, reused turn after turn.
#[derive(Default)]
pub struct CryptoBatch {
    seal_keys: KeySet,
    seals: Vec<SealJob>,
    open_keys: KeySet,
    pub(crate) opens: Vec<OpenJob>,
    /// The tunnel MTU the seals pad against (set by the device that fills the batch).
    pub(crate) mtu: usize,
    /// Seals that failed in [`run`](Self::run), which the device counts at the next fill.
    pub(crate) failed_seals: u64,
}

impl std::fmt::Debug for CryptoBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoBatch")
            .field("seals", &self.seals.len())
            .field("opens", &self.opens.len())
            .finish_non_exhaustive()
    }
}

impl CryptoBatch {
    /// An empty batch with room for `n` seals and `n` opens.
    pub fn with_capacity(n: usize) -> Self {
        CryptoBatch {
            seal_keys: KeySet(Vec::with_capacity(n.min(64))),
            seals: Vec::with_capacity(n),
            open_keys: KeySet(Vec::with_capacity(n.min(64))),
            opens: Vec::with_capacity(n),
            mtu: 0,
            failed_seals: 0,
        }
    }

    /// Whether the batch holds no job.
    pub fn is_empty(&self) -> bool {
        self.seals.is_empty() && self.opens.is_empty()
    }

    /// Messages waiting to be opened or, after [`run`](Self::run), delivered.
    pub fn opens_len(&self) -> usize {
        self.opens.len()
    }

    /// Whether opened messages wait for [`Device::complete`](crate::Device::complete).
    pub fn needs_completion(&self) -> bool {
        !self.opens.is_empty()
    }

    /// Queues a packet for sealing under `key` with `counter`, to be sent to `addr`. The
    /// device has checked head- and tailroom.
    #[inline]
    pub(crate) fn push_seal(
        &mut self,
        key: &Arc<TransportKey>,
        counter: u64,
        remote_index: u32,
        addr: SocketAddr,
        buf: PacketBuf,
    ) {
        let key = self.seal_keys.slot(key);
        self.seals.push(SealJob { key, counter, remote_index, addr, buf });
    }

    /// Queues a transport message for opening. `buf` holds the ciphertext and tag, the
    /// transport header already advanced over.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn push_open(
        &mut self,
        key: &Arc<TransportKey>,
        counter: u64,
        peer: PeerId,
        local_index: u32,
        wire_len: usize,
        addr: SocketAddr,
        buf: PacketBuf,
    ) {
        let key = self.open_keys.slot(key);
        self.opens.push(OpenJob { key, counter, peer, local_index, wire_len, addr, buf, opened: None });
    }

    /// Seals every queued packet in place and moves it, framed, to `out`; opens every queued
    /// message in place. Needs no device: this is the part to run without the engine's lock.
    pub fn run(&mut self, out: &mut Vec<Datagram>) {
        self.seal_into(out);
        self.open_pending();
    }

    /// Opens the queued messages not opened yet.
    pub(crate) fn open_pending(&mut self) {
        for job in &mut self.opens {
            if job.opened.is_none() {
                let ok = self.open_keys.get(job.key).open(job.counter, job.buf.data_mut()).is_ok();
                job.opened = Some(ok);
            }
        }
    }

    /// Moves the last `n` queued opens to `into` (an empty batch, such as a spare one kept
    /// for the purpose), so that another thread can [`run`](Self::run) them while this one
    /// runs the rest. Give them back with [`take_back_opens`](Self::take_back_opens) before
    /// [`Device::complete`](crate::Device::complete): they then deliver in their place, after
    /// the opens that stayed. Allocates nothing once `into` has held as many before.
    pub fn share_opens(&mut self, into: &mut CryptoBatch, n: usize) {
        debug_assert!(into.is_empty(), "share_opens needs an empty batch");
        let at = self.opens.len() - n.min(self.opens.len());
        into.opens.extend(self.opens.drain(at..));
        // The moved jobs name their keys by index into this table: give `into` the same table.
        into.open_keys.0.clone_from(&self.open_keys.0);
        into.mtu = self.mtu;
    }

    /// Takes back the opens [`share_opens`](Self::share_opens) moved to `from` (opening any
    /// that were not run yet), appending them after this batch's own; `from` is left empty.
    pub fn take_back_opens(&mut self, from: &mut CryptoBatch) {
        from.open_pending();
        self.opens.append(&mut from.opens);
        from.open_keys.clear();
    }

    /// Seals the queued packets into `out` (opens are left as they are).
    pub(crate) fn seal_into(&mut self, out: &mut Vec<Datagram>) {
        for mut job in self.seals.drain(..) {
            let key = self.seal_keys.get(job.key);
            if key.seal(job.counter, &mut job.buf, self.mtu).is_err() {
                // The device checked the room before queueing; count it if it ever happens.
                self.failed_seals += 1;
                continue;
            }
            let Ok(header) = job.buf.prepend(TRANSPORT_HEADER_LEN) else {
                self.failed_seals += 1;
                continue;
            };
            let header: &mut [u8; TRANSPORT_HEADER_LEN] = header.try_into().expect("prepend gives 16 bytes");
            write_transport_header(header, job.remote_index, job.counter);
            out.push(Datagram { addr: job.addr, buf: job.buf });
        }
        self.seal_keys.clear();
    }

    /// Takes the open jobs (for the device to finish), leaving an empty vector with the same
    /// capacity to be handed back through [`restore_opens`](Self::restore_opens).
    pub(crate) fn take_opens(&mut self) -> Vec<OpenJob> {
        std::mem::take(&mut self.opens)
    }

    /// Gives back the (drained) open vector and drops the keys the opens held.
    pub(crate) fn restore_opens(&mut self, mut opens: Vec<OpenJob>) {
        opens.clear();
        self.opens = opens;
        self.open_keys.clear();
    }
}
