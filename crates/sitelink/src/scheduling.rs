//! How a worker thread is scheduled: in the fair class with short slices, or, when the link
//! asks for it ([`LinkBuilder::real_time_workers`](crate::LinkBuilder::real_time_workers)),
//! under `SCHED_FIFO` while the worker is loaded and has time to spare.
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
//! Real time also costs where small packets come one by one: a worker woken at once for
//! every few packets pays a wake-up and system calls for each few, at up to three times the
//! processor time per packet, which it takes from the applications that send them when they
//! run on the same machine. A flood of 64-byte datagrams from such an application moves at
//! half the rate it does in the fair class, where packets wait a little and go in batches.
//! So a worker busier than [`BUSY`] whose turns moved fewer than [`LIGHT_TURN_BYTES`] on
//! average for [`LIGHT_WINDOWS`] windows in a row goes back to the fair class too. Its turns
//! are heavier there, so they cannot tell when real time would pay again: it returns once
//! it is under [`QUIET`], or to try again after [`FAIR_WINDOWS`]. Under a bulk transfer,
//! turns move tens of full-sized packets each (a super-packet, a run of datagrams), and
//! real time stays; when TCP recovers from a loss, turns are light for a window or two (few
//! packets, each costly: the kernel works through its out-of-order queue in the worker's
//! TUN writes), which the windows in a row let pass.
//!
//! Real time is for a loaded link only: a packet that wakes an idle real-time worker waits
//! longer than it does in the fair class (on the test machine, a virtual one, an idle ping
//! took 50-80 µs more), so a worker starts in the fair class, takes real time once it is
//! busier than [`LOADED`] and leaves it under [`IDLE`].

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

/// Bytes per turn (received and read, on average over a window) under which a turn is
/// light. Measured on the 2-processor test machine, under real time (benches/RESULTS.md):
/// 0.1-1.5 KiB in a flood of 64-byte datagrams; under a full TCP load, 40-50 KiB at the
/// 5th percentile of windows and at least 36 KiB in all but one of 478 (5.4 KiB, alone).
pub(crate) const LIGHT_TURN_BYTES: u64 = 8 * 1024;

/// Windows in a row of light turns after which a busy worker leaves real time: 500 ms, where
/// a TCP loss recovery takes one or two.
pub(crate) const LIGHT_WINDOWS: u32 = 5;

/// The share of a processor (in hundredths) under which a worker sent back to the fair
/// class for its light turns returns to real time.
pub(crate) const QUIET: u32 = 20;

/// Windows after which a worker sent back to the fair class for its light turns tries real
/// time again, however busy (5 s: a flood of small packets that goes on costs a tenth of
/// its time in real time, and a bulk transfer that follows it gets real time back).
pub(crate) const FAIR_WINDOWS: u32 = 50;

/// The share of a processor (in hundredths) under which a real-time worker goes back to the
/// fair class as idle: a packet that wakes an idle real-time worker waits longer than one
/// that wakes it in the fair class (measured, benches/RESULTS.md: idle pings 50-80 µs slower
/// under real time, and more processor time each).
pub(crate) const IDLE: u32 = 3;

/// The share of a processor (in hundredths) from which an idle worker takes real time.
pub(crate) const LOADED: u32 = 8;

/// Why a worker that asked for real time runs in the fair class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fair {
    /// Under [`IDLE`] (where every worker starts), until it is over [`LOADED`].
    Idle,
    /// Busier than [`SATURATED`].
    Saturated,
    /// Busier than [`BUSY`], in turns lighter than [`LIGHT_TURN_BYTES`].
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
    /// Why the worker runs in the fair class (`None`: under real time, if `real_time` is).
    left: Option<Fair>,
    /// Under real time, the windows of light turns in a row; in the fair class, the windows
    /// since real time was left.
    streak: u32,
    window_start: Instant,
    /// The thread's processor time when the window started.
    cpu_at_start: Duration,
    /// Turns started in this window.
    turns: u64,
    /// The worker's count of bytes moved when the window started.
    bytes_at_start: u64,
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
            left: None,
            streak: 0,
            window_start: now,
            cpu_at_start: sitelink_io::thread_cpu_time(),
            turns: 0,
            bytes_at_start: 0,
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
                            "workers run under SCHED_FIFO while loaded and with time to spare \
                             (the fair class under {IDLE}% or above {SATURATED}% of a processor)"
                        );
                    }
                    s.real_time = Some(rt);
                    // Taken, to know it is allowed; the worker starts idle, in the fair class.
                    match fair.apply() {
                        Ok(()) => s.settle(Some(Fair::Idle)),
                        Err(e) => {
                            tracing::warn!(error = %e, "back to the fair class refused; the worker stays real-time")
                        }
                    }
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
        self.real_time.is_some() && self.left.is_none()
    }

    /// Records that real time is in force (`None`) or the fair class and why, with a new streak.
    fn settle(&mut self, to: Option<Fair>) {
        self.left = to;
        self.streak = 0;
    }

    /// A turn of the worker starts at `now`, the worker having moved `bytes` (received and
    /// read) since it started: at the end of each window, the worker leaves or takes back
    /// real time by the share of a processor it used and its turns' weight (one clock read a
    /// window).
    pub(crate) fn turn(&mut self, index: usize, now: Instant, bytes: u64) {
        if self.real_time.is_none() {
            return;
        }
        self.turns += 1;
        if now.saturating_duration_since(self.window_start) < WINDOW {
            return;
        }
        if let Some(want) = self.observe(now, sitelink_io::thread_cpu_time(), bytes) {
            self.switch(index, want);
        }
    }

    /// Ends the window at `now`, with the thread's processor time `cpu` and its count of
    /// bytes moved: real time on (`None`) or the fair class and why, when that is a change.
    fn observe(&mut self, now: Instant, cpu: Duration, bytes: u64) -> Option<Option<Fair>> {
        let share = busy_share(
            cpu.saturating_sub(self.cpu_at_start),
            now.saturating_duration_since(self.window_start),
        );
        let per_turn = bytes.saturating_sub(self.bytes_at_start) / self.turns.max(1);
        tracing::trace!(
            busy_percent = share,
            turns = self.turns,
            bytes_per_turn = per_turn,
            "a worker's window"
        );
        self.window_start = now;
        self.cpu_at_start = cpu;
        self.bytes_at_start = bytes;
        self.turns = 0;
        if self.left.is_none() {
            let light = share > BUSY && per_turn < LIGHT_TURN_BYTES;
            self.streak = if light { self.streak + 1 } else { 0 };
            if share > SATURATED {
                Some(Some(Fair::Saturated))
            } else if self.streak >= LIGHT_WINDOWS {
                Some(Some(Fair::LightTurns))
            } else if share < IDLE {
                Some(Some(Fair::Idle))
            } else {
                None
            }
        } else {
            self.streak += 1;
            let back = match self.left {
                Some(Fair::Saturated) => share < RECOVERED,
                Some(Fair::LightTurns) => share < QUIET || self.streak >= FAIR_WINDOWS,
                Some(Fair::Idle) => share > LOADED,
                None => false,
            };
            if !back {
                return None;
            }
            // Quiet after a flood: idle, not real time.
            if share < IDLE && self.left != Some(Fair::Idle) {
                return Some(Some(Fair::Idle));
            }
            Some(None)
        }
    }

    /// Takes real time (`None`) or leaves it for the fair class (`Some(why)`); a refusal ends
    /// the changes.
    fn switch(&mut self, index: usize, to: Option<Fair>) {
        let (Some(fair), Some(rt)) = (self.fair, self.real_time) else { return };
        match if to.is_none() { rt.apply() } else { fair.apply() } {
            Ok(()) => {
                self.settle(to);
                match to {
                    None => tracing::debug!(worker = index, "worker loaded: under real-time scheduling"),
                    Some(Fair::Idle) => tracing::debug!(worker = index, "worker idle: in the fair class"),
                    Some(Fair::Saturated) => tracing::info!(
                        worker = index,
                        "worker saturated: in the fair class until it is under {RECOVERED}% busy"
                    ),
                    Some(Fair::LightTurns) => tracing::info!(
                        worker = index,
                        "worker busy with packets that come one by one: in the fair class, \
                         where they go in batches, until it is under {QUIET}% busy (or for 5 s)"
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
    /// `per_turn` bytes: the changes asked for.
    fn windows(s: &mut WorkerScheduling, n: u32, share: u32, per_turn: u64) -> Vec<Option<Fair>> {
        (0..n)
            .filter_map(|_| {
                let (t, cpu, bytes) = (
                    s.window_start + WINDOW,
                    s.cpu_at_start + WINDOW * share / 100,
                    s.bytes_at_start + 100 * per_turn,
                );
                s.turns = 100;
                let change = s.observe(t, cpu, bytes);
                if let Some(to) = change {
                    // As `switch` does, without changing the thread's scheduling.
                    s.settle(to);
                }
                change
            })
            .collect()
    }

    fn real_time_worker() -> WorkerScheduling {
        WorkerScheduling {
            fair: None,
            real_time: None,
            left: None,
            streak: 0,
            window_start: Instant::now(),
            cpu_at_start: Duration::from_secs(1),
            turns: 0,
            bytes_at_start: 0,
        }
    }

    #[test]
    fn a_saturated_worker_leaves_real_time_and_comes_back_when_it_has_time_to_spare() {
        let mut s = real_time_worker();
        // 91% (a full TCP load on two processors), in heavy turns: real time stays.
        assert_eq!(windows(&mut s, 5, 91, 40_000), vec![]);
        // 100% (a flood): the fair class.
        assert_eq!(windows(&mut s, 1, 100, 40_000), vec![Some(Fair::Saturated)]);
        // 70%: between the marks, it stays where it is.
        assert_eq!(windows(&mut s, 5, 70, 40_000), vec![]);
        // 45%: back to real time.
        assert_eq!(windows(&mut s, 1, 45, 40_000), vec![None]);
        assert_eq!(windows(&mut s, 5, 70, 40_000), vec![]);
    }

    #[test]
    fn a_busy_worker_in_light_turns_leaves_real_time_until_it_is_quiet_or_tries_again() {
        let mut s = real_time_worker();
        // Light turns while the worker has little to do (a ping, a voice call): real time stays.
        assert_eq!(windows(&mut s, 10, BUSY, 100), vec![]);
        // Heavy turns, busy: stays.
        assert_eq!(windows(&mut s, 10, 85, LIGHT_TURN_BYTES), vec![]);
        // Light for a window or two (a TCP loss recovery), then heavy again: stays.
        for _ in 0..3 {
            assert_eq!(windows(&mut s, LIGHT_WINDOWS - 1, 60, 300), vec![]);
            assert_eq!(windows(&mut s, 1, 85, 40_000), vec![]);
        }
        // Busy in light turns for long enough (a flood of small packets): the fair class.
        assert_eq!(windows(&mut s, LIGHT_WINDOWS - 1, BUSY + 1, LIGHT_TURN_BYTES - 1), vec![]);
        assert_eq!(windows(&mut s, 1, BUSY + 1, LIGHT_TURN_BYTES - 1), vec![Some(Fair::LightTurns)]);
        // Its turns grow heavier there, and its share may fall under the saturation
        // guard's mark: it stays, until it is quiet.
        assert_eq!(windows(&mut s, 5, 30, 30_000), vec![]);
        assert_eq!(windows(&mut s, 1, QUIET - 1, 30_000), vec![None]);
        assert_eq!(s.left, None, "under real time");
        // Or, busy all along, until it tries real time again, and leaves again if the
        // flood goes on.
        assert_eq!(windows(&mut s, LIGHT_WINDOWS, 60, 200), vec![Some(Fair::LightTurns)]);
        assert_eq!(windows(&mut s, FAIR_WINDOWS - 1, 60, 30_000), vec![]);
        assert_eq!(windows(&mut s, 1, 60, 30_000), vec![None]);
        assert_eq!(windows(&mut s, LIGHT_WINDOWS, 60, 200), vec![Some(Fair::LightTurns)]);
        // A bulk transfer after a flood has real time back within FAIR_WINDOWS, and keeps it.
        assert_eq!(windows(&mut s, FAIR_WINDOWS, 85, 40_000), vec![None]);
        assert_eq!(windows(&mut s, 100, 85, 40_000), vec![]);
    }

    #[test]
    fn windows_without_turns_count_none() {
        // The worker slept through a window: no division by zero, a quiet share (idle).
        let mut s = real_time_worker();
        let t = s.window_start + WINDOW * 3;
        assert_eq!(s.observe(t, s.cpu_at_start, 0), Some(Some(Fair::Idle)));
    }

    #[test]
    fn real_time_is_for_a_loaded_worker() {
        let mut s = real_time_worker();
        // Idle pings, a voice call: the fair class, where a wake-up is quicker.
        assert_eq!(windows(&mut s, 3, IDLE - 1, 100), vec![Some(Fair::Idle)]);
        assert_eq!(windows(&mut s, 10, LOADED, 100), vec![]);
        // Loaded: real time, kept down to IDLE.
        assert_eq!(windows(&mut s, 1, LOADED + 1, 40_000), vec![None]);
        assert_eq!(windows(&mut s, 10, IDLE, 40_000), vec![]);
        assert_eq!(windows(&mut s, 1, IDLE - 1, 40_000), vec![Some(Fair::Idle)]);
        // A flood that ends in silence: idle, not real time.
        assert_eq!(windows(&mut s, 1, 60, 40_000), vec![None]);
        assert_eq!(windows(&mut s, LIGHT_WINDOWS, 60, 100), vec![Some(Fair::LightTurns)]);
        assert_eq!(windows(&mut s, 1, 0, 0), vec![Some(Fair::Idle)]);
        assert_eq!(windows(&mut s, 1, 100, 40_000), vec![None]);
        assert_eq!(windows(&mut s, 1, 100, 40_000), vec![Some(Fair::Saturated)]);
        assert_eq!(windows(&mut s, 1, 0, 0), vec![Some(Fair::Idle)]);
    }

    #[test]
    fn a_worker_takes_real_time_and_leaves_it_for_the_fair_class_as_it_was() {
        // On a thread of its own, which the test's scheduling changes leave behind.
        std::thread::spawn(|| {
            let now = Instant::now();
            let mut s = WorkerScheduling::start(Some(1), Duration::from_micros(100), 0, now);
            if s.real_time.is_none() {
                assert!(!sitelink_io::is_root(), "real-time scheduling refused to root");
                eprintln!("SKIPPED: real-time scheduling needs root");
                return;
            }
            // Allowed, and the worker starts idle, in the fair class.
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
            // A loaded window (the worker's own clock and processor time): real time.
            let start = Instant::now();
            while start.elapsed() < WINDOW + Duration::from_millis(10) {
                std::hint::spin_loop();
            }
            s.turn(0, Instant::now(), 1 << 30);
            assert!(s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_real_time());
            // Saturated (the windows' arithmetic is the tests above): the fair class.
            s.switch(0, Some(Fair::Saturated));
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
            // A quiet window: idle, still in the fair class.
            std::thread::sleep(WINDOW + Duration::from_millis(10));
            s.turn(0, Instant::now(), 1 << 30);
            assert!(!s.real_time_now());
            assert_eq!(s.left, Some(Fair::Idle));
            assert!(ThreadScheduling::current().unwrap().is_fair());
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
