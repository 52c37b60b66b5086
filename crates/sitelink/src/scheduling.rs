//! How a worker thread is scheduled: in the fair class with short slices, or, when the link
//! asks for it ([`LinkBuilder::real_time_workers`](crate::LinkBuilder::real_time_workers)),
//! under `SCHED_FIFO` while the worker has time to spare.
//!
//! On a machine whose processors the link shares with busy applications, a packet's wait
//! through a loaded link is mostly its worker waiting for a processor: woken by the packet,
//! or preempted in the middle of a turn, it waits out another thread's slice. A real-time
//! worker runs as soon as it wakes and is not preempted by the fair class. A worker that
//! never sleeps (a flood) would then starve the machine's other threads, so each worker
//! watches the processor time it uses (its code and the kernel's work in its calls): more
//! than [`SATURATED`] of a [`WINDOW`], it goes back to the fair class, and it comes back to
//! real time once it is under [`RECOVERED`]. (A worker under real time that moves a full TCP
//! load through a 2-processor machine uses about 90%.)
//!
//! Real time also costs where packets come one by one: a worker woken at once for every
//! packet preempts the thread that sends them (on the same machine), and moves them in
//! turns of one or two, each paying a wake-up and a system call. A flood of small packets
//! then moves at half the rate it does in the fair class, where packets wait a little and
//! go in batches. So a worker busier than [`BUSY`] whose turns moved fewer than
//! [`LIGHT_TURN`] packets on average goes back to the fair class too, and returns only
//! once it is under [`QUIET`] (its turns are heavier in the fair class, so they cannot
//! tell when real time would pay again). Under a bulk transfer, turns move tens of packets
//! each (a super-packet's segments, a run of datagrams), and real time stays.

use std::time::{Duration, Instant};

use sitelink_io::ThreadScheduling;

/// The span over which a worker's busy share is measured.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// The share of a processor (in hundredths) above which a real-time worker goes back to
/// the fair class: it has no time to spare, and the machine's other threads need theirs.
pub(crate) const SATURATED: u32 = 97;

/// The share of a processor (in hundredths) under which a worker sent back to the fair
/// class returns to real time.
pub(crate) const RECOVERED: u32 = 50;

/// The share of a processor (in hundredths) above which a real-time worker whose turns are
/// light leaves real time.
pub(crate) const BUSY: u32 = 40;

/// Packets per turn (received and read, on average over a window) under which a turn is
/// light. Measured on the 2-processor test machine, under real time: 3.5-4.5 in a flood of
/// 64-byte datagrams, tens under a full TCP load.
pub(crate) const LIGHT_TURN: u64 = 8;

/// The share of a processor (in hundredths) under which a worker sent back to the fair
/// class for its light turns returns to real time.
pub(crate) const QUIET: u32 = 20;

/// Why a worker that asked for real time runs in the fair class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fair {
    /// Busier than [`SATURATED`].
    Saturated,
    /// Busier than [`BUSY`], in turns lighter than [`LIGHT_TURN`].
    LightTurns,
}

/// One worker's scheduling, and the processor time that decides it.
#[derive(Debug)]
pub(crate) struct WorkerScheduling {
    /// The worker's scheduling in the fair class (its own policy and nice value, with short
    /// slices).
    fair: Option<ThreadScheduling>,
    /// The real-time scheduling the worker takes while it has time to spare (`None`: not
    /// asked for, refused, or the thread was already real-time when it started).
    real_time: Option<ThreadScheduling>,
    /// Whether real time is in force.
    on: bool,
    /// Why real time is not in force, when it was asked for and left.
    left: Option<Fair>,
    window_start: Instant,
    /// The thread's processor time when the window started.
    cpu_at_start: Duration,
    /// Turns started in this window.
    turns: u64,
    /// The worker's count of packets moved when the window started.
    packets_at_start: u64,
}

impl WorkerScheduling {
    /// Schedules the calling thread (worker `index`): short slices of `slice` in the fair
    /// class, then `SCHED_FIFO` at `priority` if given. What the kernel refuses is logged (by
    /// worker 0) and the worker runs on as it is.
    pub(crate) fn start(
        priority: Option<u8>,
        slice: Duration,
        index: usize,
        now: Instant,
    ) -> WorkerScheduling {
        let mut s = WorkerScheduling {
            fair: None,
            real_time: None,
            on: false,
            left: None,
            window_start: now,
            cpu_at_start: sitelink_io::thread_cpu_time(),
            turns: 0,
            packets_at_start: 0,
        };
        let current = match ThreadScheduling::current() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "the thread's scheduling could not be read");
                return s;
            }
        };
        if current.is_real_time() {
            // The operator's choice (chrt, systemd CPUSchedulingPolicy=): kept as it is.
            if index == 0 {
                tracing::info!(?current, "workers keep the real-time scheduling they were started with");
            }
            return s;
        }
        let fair = current.with_slice(slice);
        if let Err(e) = fair.apply() {
            // Kernels before 6.12 (no EEVDF slices) refuse it; the link works the same.
            tracing::debug!(error = %e, "the scheduler refused a short slice");
        }
        s.fair = Some(fair);
        if let Some(priority) = priority {
            let rt = fair.real_time(priority);
            match rt.apply() {
                Ok(()) => {
                    if index == 0 {
                        tracing::info!(
                            priority,
                            "workers run under SCHED_FIFO while they have time to spare \
                             (the fair class above {SATURATED}% of a processor)"
                        );
                    }
                    s.real_time = Some(rt);
                    s.on = true;
                }
                Err(e) if index == 0 => {
                    tracing::info!(error = %e, "real-time scheduling refused; workers stay in the fair class")
                }
                Err(_) => {}
            }
        }
        s
    }

    /// Whether the worker runs under real time now.
    #[cfg(test)]
    pub(crate) fn real_time_now(&self) -> bool {
        self.on
    }

    /// A turn of the worker starts at `now`, the worker having moved `packets` (received
    /// and read) since it started: at the end of each window, the worker leaves or takes back
    /// real time by the share of a processor it used and its turns' weight (one clock read a
    /// window).
    pub(crate) fn turn(&mut self, index: usize, now: Instant, packets: u64) {
        if self.real_time.is_none() {
            return;
        }
        self.turns += 1;
        if now.saturating_duration_since(self.window_start) < WINDOW {
            return;
        }
        if let Some(want) = self.observe(now, sitelink_io::thread_cpu_time(), packets) {
            self.switch(index, want);
        }
    }

    /// Ends the window at `now`, with the thread's processor time `cpu` and its count of
    /// packets moved: real time on (`None`) or the fair class and why, when that is a change.
    fn observe(&mut self, now: Instant, cpu: Duration, packets: u64) -> Option<Option<Fair>> {
        let share = busy_share(
            cpu.saturating_sub(self.cpu_at_start),
            now.saturating_duration_since(self.window_start),
        );
        let per_turn = packets.saturating_sub(self.packets_at_start) / self.turns.max(1);
        tracing::trace!(busy_percent = share, packets_per_turn = per_turn, "a worker's window");
        self.window_start = now;
        self.cpu_at_start = cpu;
        self.packets_at_start = packets;
        self.turns = 0;
        if self.on {
            if share > SATURATED {
                Some(Some(Fair::Saturated))
            } else if share > BUSY && per_turn < LIGHT_TURN {
                Some(Some(Fair::LightTurns))
            } else {
                None
            }
        } else {
            let back = match self.left {
                Some(Fair::Saturated) => share < RECOVERED,
                Some(Fair::LightTurns) => share < QUIET,
                None => false,
            };
            back.then_some(None)
        }
    }

    /// Takes real time (`None`) or leaves it for the fair class (`Some(why)`); a refusal ends
    /// the changes.
    fn switch(&mut self, index: usize, to: Option<Fair>) {
        let (Some(fair), Some(rt)) = (self.fair, self.real_time) else { return };
        match if to.is_none() { rt.apply() } else { fair.apply() } {
            Ok(()) => {
                self.on = to.is_none();
                self.left = to;
                match to {
                    None => tracing::info!(worker = index, "worker back under real-time scheduling"),
                    Some(Fair::Saturated) => tracing::info!(
                        worker = index,
                        "worker saturated: in the fair class until it is under {RECOVERED}% busy"
                    ),
                    Some(Fair::LightTurns) => tracing::info!(
                        worker = index,
                        "worker busy with packets that come one by one: in the fair class, \
                         where they go in batches, until it is under {QUIET}% busy"
                    ),
                }
            }
            Err(e) => {
                // Real time taken away (a cgroup's budget changed): no more changes.
                tracing::warn!(worker = index, error = %e, "changing the worker's scheduling failed");
                self.real_time = None;
            }
        }
    }
}

/// `busy` as hundredths of `window`, at most 100.
fn busy_share(busy: Duration, window: Duration) -> u32 {
    if window.is_zero() {
        return 100;
    }
    (busy.as_nanos().saturating_mul(100) / window.as_nanos()).min(100) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_share_is_in_hundredths() {
        let ms = Duration::from_millis;
        assert_eq!(busy_share(ms(45), ms(100)), 45);
        assert_eq!(busy_share(ms(300), ms(100)), 100);
        assert_eq!(busy_share(ms(1), Duration::ZERO), 100);
    }

    /// Windows of `share` percent of a processor, `n` of them, each of 100 turns moving
    /// `per_turn` packets: the changes asked for.
    fn windows(s: &mut WorkerScheduling, n: u32, share: u32, per_turn: u64) -> Vec<Option<Fair>> {
        (0..n)
            .filter_map(|_| {
                let (t, cpu, packets) = (
                    s.window_start + WINDOW,
                    s.cpu_at_start + WINDOW * share / 100,
                    s.packets_at_start + 100 * per_turn,
                );
                s.turns = 100;
                let change = s.observe(t, cpu, packets);
                if let Some(to) = change {
                    // As `switch` does, without changing the thread's scheduling.
                    s.on = to.is_none();
                    s.left = to;
                }
                change
            })
            .collect()
    }

    fn real_time_worker() -> WorkerScheduling {
        WorkerScheduling {
            fair: None,
            real_time: None,
            on: true,
            left: None,
            window_start: Instant::now(),
            cpu_at_start: Duration::from_secs(1),
            turns: 0,
            packets_at_start: 0,
        }
    }

    #[test]
    fn a_saturated_worker_leaves_real_time_and_comes_back_when_it_has_time_to_spare() {
        let mut s = real_time_worker();
        // 91% (a full TCP load on two processors), in heavy turns: real time stays.
        assert_eq!(windows(&mut s, 5, 91, 40), vec![]);
        // 100% (a flood): the fair class.
        assert_eq!(windows(&mut s, 1, 100, 40), vec![Some(Fair::Saturated)]);
        // 70%: between the marks, it stays where it is.
        assert_eq!(windows(&mut s, 5, 70, 40), vec![]);
        // 45%: back to real time.
        assert_eq!(windows(&mut s, 1, 45, 40), vec![None]);
        assert_eq!(windows(&mut s, 5, 70, 40), vec![]);
    }

    #[test]
    fn a_busy_worker_in_light_turns_leaves_real_time_until_it_is_quiet() {
        let mut s = real_time_worker();
        // Light turns while the worker has little to do (a ping, a voice call): real time stays.
        assert_eq!(windows(&mut s, 5, BUSY, 1), vec![]);
        // Heavy turns, busy: stays.
        assert_eq!(windows(&mut s, 5, 85, LIGHT_TURN), vec![]);
        // Busy in light turns (a flood of small packets): the fair class.
        assert_eq!(windows(&mut s, 1, BUSY + 1, LIGHT_TURN - 1), vec![Some(Fair::LightTurns)]);
        // Its turns grow heavier there, and its share may fall under the saturation
        // guard's mark: it stays, until it is quiet.
        assert_eq!(windows(&mut s, 5, 30, 30), vec![]);
        assert_eq!(windows(&mut s, 1, QUIET - 1, 30), vec![None]);
        assert!(s.on);
    }

    #[test]
    fn windows_without_turns_count_none() {
        // The worker slept through a window: no division by zero, a quiet share.
        let mut s = real_time_worker();
        let t = s.window_start + WINDOW * 3;
        assert_eq!(s.observe(t, s.cpu_at_start, 0), None);
    }

    #[test]
    fn a_worker_takes_real_time_and_leaves_it_for_the_fair_class_as_it_was() {
        // On a thread of its own, which the test's scheduling changes leave behind.
        std::thread::spawn(|| {
            let now = Instant::now();
            let mut s = WorkerScheduling::start(Some(1), Duration::from_micros(100), 0, now);
            if !s.real_time_now() {
                assert!(!sitelink_io::is_root(), "real-time scheduling refused to root");
                eprintln!("SKIPPED: real-time scheduling needs root");
                return;
            }
            assert!(ThreadScheduling::current().unwrap().is_real_time());
            // Saturated (the windows' arithmetic is the test above): the fair class.
            s.switch(0, Some(Fair::Saturated));
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
            // A quiet window: real time again, through the worker's own clock.
            std::thread::sleep(WINDOW + Duration::from_millis(10));
            s.turn(0, Instant::now(), 0);
            assert!(s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_real_time());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn without_real_time_asked_for_the_worker_stays_in_the_fair_class() {
        std::thread::spawn(|| {
            let mut s = WorkerScheduling::start(None, Duration::from_micros(100), 0, Instant::now());
            std::thread::sleep(WINDOW + Duration::from_millis(10));
            s.turn(0, Instant::now(), 0);
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
        })
        .join()
        .unwrap();
    }
}
