//! Workers lend each other their cores for opening.
//!
//! A link's datagrams from one peer all reach one worker's socket (`SO_REUSEPORT` picks the
//! socket by source address), so on a link with one busy peer the receiving worker would open
//! everything while the others idle. When a worker holds a large batch of opens and another
//! worker is idle, it moves the second half of the opens to a spare batch, posts it here and
//! wakes the idle worker, then opens its own half. Afterwards it takes the posted half back:
//! if no one started it, it opens it itself; if a helper is running it, it waits for that
//! (a helper never waits on anything while it runs a job, so this cannot deadlock). The
//! receiving worker then delivers all of them in order, so sharing never reorders a flow.
//!
//! Nothing here allocates per batch: the queue holds at most one job per worker and was sized
//! for that, and each worker's spare batch travels to the helper and back.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use sitelink_proto::CryptoBatch;

use crate::sync::lock;

/// A batch needs at least this many opens before half of it is worth a wake-up elsewhere
/// (a wake-up costs a few microseconds; 16 opens of 1420 bytes cost about 18).
pub(crate) const MIN_OPENS_TO_SHARE: usize = 32;

/// Posted work: opens of worker `from`, to run and hand back.
struct Job {
    from: usize,
    batch: CryptoBatch,
}

/// Hands an empty batch back to a waiting poster if dropped, which happens only while the
/// helper unwinds from a panic (on success it is forgotten).
struct ReturnOnUnwind<'a>(Option<&'a Return>);

impl Drop for ReturnOnUnwind<'_> {
    fn drop(&mut self) {
        if let Some(ret) = self.0.take() {
            *lock(&ret.batch) = Some(CryptoBatch::default());
            ret.ready.notify_one();
        }
    }
}

/// Where one worker's shared opens come back.
#[derive(Default)]
struct Return {
    batch: Mutex<Option<CryptoBatch>>,
    ready: Condvar,
}

/// Where workers share the opening of large batches (see the module's docs).
pub(crate) struct OpenSharing {
    queue: Mutex<Vec<Job>>,
    /// Jobs in `queue`, so that a worker with nothing to help with skips the lock. A stale
    /// read only delays help: a job no one takes is taken back by its poster.
    posted: AtomicUsize,
    returns: Vec<Return>,
    /// Bit `i` set while worker `i` waits for I/O with nothing to do.
    idle: AtomicU64,
    /// Opens run by a worker for another.
    pub(crate) opens_shared: AtomicU64,
}

impl OpenSharing {
    /// Opens shared among `workers` workers (at most 64).
    pub(crate) fn new(workers: usize) -> Self {
        debug_assert!(workers <= 64);
        OpenSharing {
            queue: Mutex::new(Vec::with_capacity(workers)),
            posted: AtomicUsize::new(0),
            returns: (0..workers).map(|_| Return::default()).collect(),
            idle: AtomicU64::new(0),
            opens_shared: AtomicU64::new(0),
        }
    }

    /// Worker `index` is about to wait for I/O, or has stopped waiting.
    pub(crate) fn set_idle(&self, index: usize, idle: bool) {
        let bit = 1u64 << index;
        if idle {
            self.idle.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.idle.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// Opens `batch`'s opens with help if it is large and a worker is idle (moving half
    /// through `spare`, an empty batch kept for it and left empty; `wake(i)` wakes worker `i`);
    /// else opens them alone. Seals are run too, into `out`: this is [`CryptoBatch::run`]
    /// with help.
    pub(crate) fn run(
        &self,
        index: usize,
        wake: impl Fn(usize),
        batch: &mut CryptoBatch,
        spare: &mut CryptoBatch,
        out: &mut Vec<sitelink_proto::Datagram>,
    ) {
        let others_idle = self.idle.load(Ordering::Acquire) & !(1u64 << index);
        if others_idle == 0 || batch.opens_len() < MIN_OPENS_TO_SHARE {
            return batch.run(out);
        }
        let mut half = std::mem::take(spare);
        batch.share_opens(&mut half, batch.opens_len() / 2);
        {
            let mut queue = lock(&self.queue);
            queue.push(Job { from: index, batch: half });
            self.posted.store(queue.len(), Ordering::Release);
        }
        wake(others_idle.trailing_zeros() as usize);
        batch.run(out);
        let unclaimed = self.take_job(|from| from == index);
        let mut half = match unclaimed {
            Some(job) => job.batch,
            None => {
                let ret = &self.returns[index];
                let mut slot = lock(&ret.batch);
                loop {
                    if let Some(b) = slot.take() {
                        break b;
                    }
                    slot = ret.ready.wait(slot).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
        };
        batch.take_back_opens(&mut half);
        *spare = half;
    }

    /// Removes and returns a posted job whose poster `pick` accepts.
    fn take_job(&self, pick: impl Fn(usize) -> bool) -> Option<Job> {
        let mut queue = lock(&self.queue);
        let job = queue.iter().position(|j| pick(j.from)).map(|p| queue.swap_remove(p));
        self.posted.store(queue.len(), Ordering::Release);
        job
    }

    /// Runs every job other workers posted (worker `index` is not one of them).
    pub(crate) fn help(&self, index: usize) {
        while self.posted.load(Ordering::Acquire) > 0 {
            let Some(job) = self.take_job(|from| from != index) else { return };
            let mut batch = job.batch;
            let n = batch.opens_len() as u64;
            let ret = &self.returns[job.from];
            // If this worker panics while opening, the poster, which waits for the batch,
            // gets an empty one instead of waiting forever (the link is stopping then).
            let unwinding = ReturnOnUnwind(Some(ret));
            // Opens only: nothing is sealed, so nothing is sent from here.
            batch.run(&mut Vec::new());
            std::mem::forget(unwinding);
            self.opens_shared.fetch_add(n, Ordering::Relaxed);
            *lock(&ret.batch) = Some(batch);
            ret.ready.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_that_panics_still_answers_the_poster() {
        let ret = Return::default();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _unwinding = ReturnOnUnwind(Some(&ret));
            panic!("a helper failing mid-open");
        }));
        assert!(result.is_err());
        assert!(lock(&ret.batch).is_some(), "the poster would have waited forever");
    }
    use sitelink_frame::ip;
    use sitelink_proto::sim::Net;
    use sitelink_proto::{Datagram, PacketBuf};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// 64 sealed transport messages from node 0 to node 1 of `net`, numbered from `first`.
    fn sealed(net: &mut Net, first: u32) -> Vec<Datagram> {
        let (src, dst, from) = (net.nodes[0].inner, net.nodes[1].inner, net.nodes[0].addr);
        let a = &mut net.nodes[0].dev;
        let mut packets: Vec<PacketBuf> = (first..first + 64)
            .map(|i| {
                let mut buf = a.alloc_buf();
                let n = ip::build_ipv4(buf.spare_mut(), src, dst, 17, &i.to_be_bytes()).unwrap();
                buf.set_len(n).unwrap();
                buf
            })
            .collect();
        let mut out = Vec::new();
        a.encapsulate(net.now, &mut packets, &mut out);
        out.iter_mut().for_each(|d| d.addr = from);
        out
    }

    #[test]
    fn an_idle_worker_opens_half_and_order_is_kept() {
        let mut net = Net::pair(21);
        net.send(0, 1, b"x");
        net.run_for(Duration::from_millis(50));
        assert_eq!(net.take_delivered(1).len(), 1);
        let sharing = OpenSharing::new(2);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            // Worker 1: idle, helping whenever there is work.
            s.spawn(|| {
                sharing.set_idle(1, true);
                while !stop.load(Ordering::Relaxed) {
                    sharing.help(1);
                    std::hint::spin_loop();
                }
            });
            let mut spare = CryptoBatch::with_capacity(64);
            let mut batch = CryptoBatch::with_capacity(64);
            let (mut out, mut delivered) = (Vec::new(), Vec::new());
            // At least 50 rounds, and on until the helper has taken a share (on a loaded
            // machine its thread may not run at all during the first ones).
            let mut rounds = 0u32;
            let mut next = 0u32;
            while rounds < 50 || (sharing.opens_shared.load(Ordering::Relaxed) == 0 && rounds < 20_000) {
                let round = rounds;
                rounds += 1;
                let mut dgrams = sealed(&mut net, round * 64);
                let now = net.now;
                let b = &mut net.nodes[1].dev;
                b.decapsulate_deferred(now, &mut dgrams, &mut batch, &mut out);
                sharing.run(
                    0,
                    |i| assert_eq!(i, 1, "only worker 1 is idle"),
                    &mut batch,
                    &mut spare,
                    &mut out,
                );
                assert!(spare.is_empty(), "the spare came back empty");
                b.complete(now, &mut batch, &mut delivered, &mut out);
                for p in delivered.drain(..) {
                    let seq = u32::from_be_bytes(p.data()[20..24].try_into().unwrap());
                    assert_eq!(seq, next, "every packet, in order");
                    next += 1;
                    net.nodes[0].dev.recycle(p);
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert_eq!(next, rounds * 64, "every packet delivered");
        });
        let shared = sharing.opens_shared.load(Ordering::Relaxed);
        assert!(shared > 0 && shared % 32 == 0, "the helper opened {shared}");
        assert_eq!(net.nodes[1].dev.stats().drops.total(), 0);
    }

    #[test]
    fn with_no_idle_worker_a_batch_is_opened_alone() {
        let sharing = OpenSharing::new(2);
        let mut spare = CryptoBatch::default();
        let mut batch = CryptoBatch::default();
        sharing.run(0, |_| panic!("no one to wake"), &mut batch, &mut spare, &mut Vec::new());
        sharing.set_idle(0, true);
        sharing.run(0, |_| panic!("a worker does not wake itself"), &mut batch, &mut spare, &mut Vec::new());
        assert_eq!(sharing.opens_shared.load(Ordering::Relaxed), 0);
    }
}
