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
    window_start: Instant,
    /// The thread's processor time when the window started.
    cpu_at_start: Duration,
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
            window_start: now,
            cpu_at_start: sitelink_io::thread_cpu_time(),
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

    /// A turn of the worker starts at `now`: at the end of each window, the worker leaves or
    /// takes back real time by the share of a processor it used (one clock read a window).
    pub(crate) fn turn(&mut self, index: usize, now: Instant) {
        if self.real_time.is_none() || now.saturating_duration_since(self.window_start) < WINDOW {
            return;
        }
        if let Some(want) = self.observe(now, sitelink_io::thread_cpu_time()) {
            self.switch(index, want);
        }
    }

    /// Ends the window at `now`, with the thread's processor time `cpu`: whether real time
    /// should now be on, when that is a change.
    fn observe(&mut self, now: Instant, cpu: Duration) -> Option<bool> {
        let share = busy_share(
            cpu.saturating_sub(self.cpu_at_start),
            now.saturating_duration_since(self.window_start),
        );
        tracing::trace!(busy_percent = share, "a worker's share of a processor");
        self.window_start = now;
        self.cpu_at_start = cpu;
        let want = if self.on { share <= SATURATED } else { share < RECOVERED };
        (want != self.on).then_some(want)
    }

    /// Takes real time (`want`) or leaves it for the fair class; a refusal ends the changes.
    fn switch(&mut self, index: usize, want: bool) {
        let (Some(fair), Some(rt)) = (self.fair, self.real_time) else { return };
        match if want { rt.apply() } else { fair.apply() } {
            Ok(()) if want => {
                self.on = true;
                tracing::info!(worker = index, "worker back under real-time scheduling");
            }
            Ok(()) => {
                self.on = false;
                tracing::info!(
                    worker = index,
                    "worker saturated: in the fair class until it is under {RECOVERED}% busy"
                );
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

    /// Windows of `share` percent of a processor, `n` of them, from `t` and `cpu`.
    fn windows(
        s: &mut WorkerScheduling,
        t: &mut Instant,
        cpu: &mut Duration,
        n: u32,
        share: u32,
    ) -> Vec<bool> {
        (0..n)
            .filter_map(|_| {
                *t += WINDOW;
                *cpu += WINDOW * share / 100;
                s.observe(*t, *cpu)
            })
            .collect()
    }

    #[test]
    fn a_saturated_worker_leaves_real_time_and_comes_back_when_it_has_time_to_spare() {
        let (mut t, mut cpu) = (Instant::now(), Duration::from_secs(1));
        let mut s =
            WorkerScheduling { fair: None, real_time: None, on: true, window_start: t, cpu_at_start: cpu };
        // 91% (a full TCP load on two processors): real time stays.
        assert_eq!(windows(&mut s, &mut t, &mut cpu, 5, 91), vec![]);
        // 100% (a flood): the fair class.
        assert_eq!(windows(&mut s, &mut t, &mut cpu, 1, 100), vec![false]);
        s.on = false;
        // 70%: between the marks, it stays where it is.
        assert_eq!(windows(&mut s, &mut t, &mut cpu, 5, 70), vec![]);
        // 20%: back to real time.
        assert_eq!(windows(&mut s, &mut t, &mut cpu, 1, 20), vec![true]);
        s.on = true;
        assert_eq!(windows(&mut s, &mut t, &mut cpu, 5, 70), vec![]);
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
            s.switch(0, false);
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
            // A quiet window: real time again, through the worker's own clock.
            std::thread::sleep(WINDOW + Duration::from_millis(10));
            s.turn(0, Instant::now());
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
            s.turn(0, Instant::now());
            assert!(!s.real_time_now());
            assert!(ThreadScheduling::current().unwrap().is_fair());
        })
        .join()
        .unwrap();
    }
}
