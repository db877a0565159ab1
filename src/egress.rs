//! The egress boundary's async side and its audit: the parts of a decision
//! that need I/O or shared state — the guest's name pins, our own
//! resolution of a claimed name, and the audit line with its counter —
//! around the pure [`Policy::judge`]. Every path that decides a flow comes
//! here or to `judge` directly: the engine at a SYN, datagram or echo and
//! in its first-bytes gate (synchronously, with [`Egress::pinned`]), the
//! first-bytes service and TLS interception ([`Egress::decide`]).
//!
//! One per VMM connection (the pins are the guest's); the policy is the
//! daemon's. `decide` runs on tokio tasks; the rest on any thread.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{self, Reason};
use crate::dns::forward::Forwarder;
use crate::dns::pins::Pins;
use crate::metrics::{Counter, Metrics};
use crate::names::NameSource;
use crate::policy::{Claim, Denied, Policy, Proto, Query, Verdict};

/// The egress side of one guest.
pub struct Egress {
    policy: Arc<Policy>,
    pins: Arc<Pins>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
}

/// A TCP flow whose decision waits for its name: where the guest
/// connected, where it really goes, and the dial budget.
#[derive(Clone)]
pub struct Target {
    /// Where the guest connected.
    pub dst: SocketAddr,
    /// Where to dial (the gateway's host mapping applied).
    pub upstream: SocketAddr,
    /// Dial budget.
    pub connect_timeout: Duration,
    /// The boundary that decides it.
    pub egress: Arc<Egress>,
}

impl Egress {
    /// The boundary over `policy` (the daemon's), with the guest's `pins`
    /// and the `forwarder` that answers the guest's DNS (which pins them).
    pub fn new(
        policy: Arc<Policy>,
        pins: Arc<Pins>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            policy,
            pins,
            forwarder,
            metrics,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The DNS forwarder of this guest.
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// The live names the guest's DNS answers gave `addr`, newest first.
    pub fn pinned(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        self.pins.names_of(addr, now)
    }

    /// Decides a TCP flow to `dst` from what its first bytes claim: the
    /// pins, the policy, and — for a name that allows a flow no DNS answer
    /// stands behind — our own resolution of it. Denies are not audited
    /// here; the caller does that with [`Egress::deny`] (it knows the name
    /// it will log).
    pub async fn decide(&self, dst: SocketAddr, claim: Claim<'_>) -> Result<(), Denied> {
        let pinned = self.pinned(dst.ip(), Instant::now());
        let query = Query {
            dst: dst.ip(),
            proto: Proto::Tcp,
            port: Some(dst.port()),
            pinned: &pinned,
            claim,
        };
        match self.policy.judge(&query) {
            Verdict::Allow(_) | Verdict::NeedsName => Ok(()),
            Verdict::Deny(denied) => Err(denied),
            Verdict::Resolve(name) => {
                if self.forwarder.resolves_to(name, dst.ip()).await {
                    Ok(())
                } else {
                    Err((None, Reason::NameNotResolving))
                }
            }
        }
    }

    /// Counts and audits a denied flow.
    pub fn deny(
        &self,
        proto: Proto,
        dst: IpAddr,
        port: Option<u16>,
        name: Option<(&str, NameSource)>,
        (rule, reason): Denied,
    ) {
        self.metrics.inc(Counter::policy_denied);
        audit::deny(&audit::Deny {
            proto: proto.as_str(),
            dst: Some(dst),
            port: port.unwrap_or(0),
            name: name.map(|(n, _)| n),
            name_source: name.map(|(_, s)| s.as_str()),
            rule,
            reason,
        });
    }

    /// Counts an allowed flow.
    pub fn allowed(&self) {
        self.metrics.inc(Counter::policy_allowed);
    }
}

impl Target {
    /// Decides the flow from its first bytes' claim; a deny is counted and
    /// audited.
    pub async fn decide(&self, claim: Claim<'_>) -> Result<(), Denied> {
        let result = self.egress.decide(self.dst, claim).await;
        if let Err(denied) = result {
            let name = match claim {
                Claim::Named(n, s) => Some((n, s)),
                Claim::Unread | Claim::Unnamed => None,
            };
            let (ip, port) = (self.dst.ip(), Some(self.dst.port()));
            self.egress.deny(Proto::Tcp, ip, port, name, denied);
        }
        result
    }
}
