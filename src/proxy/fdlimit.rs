//! The process's descriptor limit: raised at start to what the config's
//! limits need, and a running out of descriptors made loud (counted and
//! logged, at most once per ten seconds) rather than showing up only as
//! refused flows.
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::Config;
use crate::metrics::{Counter, Metrics};

/// How often running out of descriptors is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Descriptors besides the flows': the vhost-user sockets, the guest's
/// memory regions, eventfds and epolls per queue pair, the runtime, logs.
const SLACK: u64 = 256;

/// Descriptors the config's limits can hold open at once: one host socket
/// per TCP flow, UDP session and echo session, plus each published port's
/// listener and sessions, plus 256 of its own.
pub fn needed(config: &Config) -> u64 {
    let flows = config.tcp.max_connections + config.udp.max_sessions + config.icmp.max_sessions;
    let published = config.publish.len() * 2;
    u64::try_from(flows + published)
        .unwrap_or(u64::MAX)
        .saturating_add(SLACK)
}

/// What [`raise`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit (the ceiling for `soft`).
    pub hard: u64,
}

/// Raises the soft descriptor limit to `needed` (never above the hard
/// limit, never lowering it); returns the limits in force afterwards.
pub fn raise(needed: u64) -> io::Result<Limit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let want = needed.min(hard);
    if soft >= want {
        return Ok(Limit { soft, hard });
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => Ok(Limit { soft: want, hard }),
        // A seccomp filter without setrlimit (the systemd unit's denies
        // @resources) leaves the limit as the unit set it.
        Err(_) => Ok(Limit { soft, hard }),
    }
}

/// Whether an error means the process or the system ran out of
/// descriptors.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

static LAST_WARNED: AtomicU64 = AtomicU64::new(0);

/// Logs running out of descriptors while `what`, at most once per
/// ten seconds for the whole process; counts it when `metrics` is given.
/// Returns whether `e` was that.
pub fn note(e: &io::Error, what: &str, metrics: Option<&Metrics>) -> bool {
    if !is_exhaustion(e) {
        return false;
    }
    if let Some(m) = metrics {
        m.inc(Counter::fd_limit_hit);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_WARNED.load(Ordering::Relaxed);
    if now >= last.saturating_add(WARN_EVERY.as_secs())
        && LAST_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            error = %e,
            what,
            "out of file descriptors: raise LimitNOFILE (or lower the flow limits)"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_counts_every_flow_limit() {
        let config = Config::default();
        let flows = config.tcp.max_connections + config.udp.max_sessions + config.icmp.max_sessions;
        assert_eq!(needed(&config), u64::try_from(flows).unwrap() + SLACK);
    }

    #[test]
    fn exhaustion_is_emfile_and_enfile_only() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
        let metrics = Metrics::default();
        assert!(note(
            &io::Error::from_raw_os_error(libc::EMFILE),
            "test",
            Some(&metrics)
        ));
        assert!(!note(
            &io::Error::from_raw_os_error(libc::EAGAIN),
            "test",
            Some(&metrics)
        ));
        assert_eq!(metrics.get(Counter::fd_limit_hit), 1);
    }

    #[test]
    fn raise_never_lowers_the_limit() {
        let before = raise(0).unwrap();
        let after = raise(1).unwrap();
        assert_eq!(before, after);
    }
}
