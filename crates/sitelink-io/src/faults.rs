//! Refusals forced for tests: each offload has a fallback for kernels (or containers) that
//! refuse it, and each fallback has a test that makes the refusal happen here, on a kernel
//! that would not refuse.
//!
//! Two ways in, both read by the I/O calls below and nowhere on a per-packet path but the
//! refused ones: the environment variable `SITELINK_TEST_REFUSE` (a comma-separated list of
//! [`Fault::name`]s, read once, so a test can start a daemon that meets an "old kernel"), and
//! [`force`] (with the `testing` feature, for tests in process).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A kernel refusal that can be forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `TUNSETOFFLOAD` fails (an old kernel, some containers): no TUN offloads.
    TunOffload,
    /// `TUNSETOFFLOAD` with `TUN_F_USO4`/`TUN_F_USO6` fails (kernels before 6.2).
    Uso,
    /// Writing a GSO super-packet to the TUN device fails with `EINVAL` (a known kernel
    /// regression).
    GroWrite,
    /// A UDP GSO send fails with `EIO` (an egress device without checksum offload).
    GsoSend,
    /// Setting `UDP_GRO` on a socket fails (kernels before 5.0).
    UdpGro,
}

impl Fault {
    const ALL: [Fault; 5] = [Fault::TunOffload, Fault::Uso, Fault::GroWrite, Fault::GsoSend, Fault::UdpGro];

    /// The name `SITELINK_TEST_REFUSE` lists it by.
    pub fn name(self) -> &'static str {
        match self {
            Fault::TunOffload => "tun-offload",
            Fault::Uso => "uso",
            Fault::GroWrite => "gro-write",
            Fault::GsoSend => "gso-send",
            Fault::UdpGro => "udp-gro",
        }
    }

    fn bit(self) -> u32 {
        1 << Fault::ALL.iter().position(|&f| f == self).expect("listed")
    }
}

static FORCED: AtomicU32 = AtomicU32::new(0);
static FROM_ENV: OnceLock<u32> = OnceLock::new();

fn from_env() -> u32 {
    *FROM_ENV.get_or_init(|| {
        let Ok(list) = std::env::var("SITELINK_TEST_REFUSE") else { return 0 };
        let mut bits = 0;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match Fault::ALL.iter().find(|f| f.name() == name) {
                Some(f) => bits |= f.bit(),
                None => tracing::warn!("SITELINK_TEST_REFUSE: unknown refusal {name:?}"),
            }
        }
        if bits != 0 {
            tracing::warn!("SITELINK_TEST_REFUSE={list}: forcing kernel refusals (a test setting)");
        }
        bits
    })
}

/// Whether `fault` is forced.
#[inline]
pub(crate) fn refused(fault: Fault) -> bool {
    (FORCED.load(Ordering::Relaxed) | from_env()) & fault.bit() != 0
}

/// Forces `fault` on (or off) for every backend of this process, from now on.
#[cfg(feature = "testing")]
pub fn force(fault: Fault, on: bool) {
    if on {
        FORCED.fetch_or(fault.bit(), Ordering::Relaxed);
    } else {
        FORCED.fetch_and(!fault.bit(), Ordering::Relaxed);
    }
}
