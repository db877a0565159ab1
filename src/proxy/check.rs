//! Whether a name from a flow's own bytes (TLS SNI, HTTP Host) may decide
//! the flow, and what the policy then says: the name must belong to the
//! address — one of the names the guest's DNS answers gave it, or, with no
//! answer behind the address, a name that resolves to it through our own
//! forwarder — so an allowed name cannot be claimed to reach any address.
//! Used by the flows decided on their first bytes and by TLS interception;
//! the engine's gate does the pinned case synchronously.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::Reason;
use crate::dns::forward::Forwarder;
use crate::dns::pins::Pins;
use crate::policy::{Action, Flow, NameSource, Policy, Proto};

/// The parts a name check reads.
#[derive(Clone)]
pub struct NameCheck {
    /// The egress policy.
    pub policy: Arc<Policy>,
    /// Names the guest's DNS answers gave each address.
    pub pins: Arc<Pins>,
    /// For names with no answer behind the address.
    pub forwarder: Arc<Forwarder>,
}

/// A deny: the rule (when the policy decided) and why.
pub type Denied = (Option<usize>, Reason);

impl NameCheck {
    /// Decides a TCP flow to `dst` named `name` (None: decided by its
    /// address and pins alone).
    pub async fn decide(
        &self,
        dst: SocketAddr,
        name: Option<(&str, NameSource)>,
    ) -> Result<(), Denied> {
        let pinned = self.pins.names_of(dst.ip(), Instant::now());
        match decide_known(&self.policy, &pinned, dst, name)? {
            Some(n) if !self.forwarder.resolves_to(n, dst.ip()).await => {
                Err((None, Reason::NameNotResolving))
            }
            _ => Ok(()),
        }
    }
}

/// What can be decided without I/O: a name must be one of `pinned` (the
/// names the address was given for) when there are any, then the policy
/// decides. Ok(Some(name)): allowed only by a name with no DNS answer
/// behind the address, which must still be shown to resolve to it.
pub fn decide_known<'a>(
    policy: &Policy,
    pinned: &[String],
    dst: SocketAddr,
    name: Option<(&'a str, NameSource)>,
) -> Result<Option<&'a str>, Denied> {
    if let Some((n, _)) = name
        && !pinned.is_empty()
        && !pinned.iter().any(|p| p == n)
    {
        return Err((None, Reason::NameNotPinned));
    }
    let flow = Flow {
        dst: dst.ip(),
        proto: Proto::Tcp,
        port: Some(dst.port()),
        name: name.or_else(|| pinned.first().map(|p| (p.as_str(), NameSource::Dns))),
    };
    let decision = policy.decide(&flow);
    if decision.action == Action::Deny {
        return Err((decision.rule, Reason::Policy));
    }
    let Some((n, _)) = name.filter(|_| pinned.is_empty()) else {
        return Ok(None);
    };
    // Only a name that is what allows the flow needs checking.
    let unnamed = policy.decide(&Flow { name: None, ..flow });
    Ok((unnamed.action != Action::Allow).then_some(n))
}

/// Audits and counts a deny from [`NameCheck::decide`].
pub fn audit(
    metrics: &crate::metrics::Metrics,
    dst: SocketAddr,
    name: Option<(&str, NameSource)>,
    (rule, reason): Denied,
) {
    metrics.inc(crate::metrics::Counter::policy_denied);
    crate::audit::deny(&crate::audit::Deny {
        proto: "tcp",
        dst: Some(dst.ip()),
        port: dst.port(),
        name: name.map(|(n, _)| n),
        name_source: name.map(|(_, s)| s.as_str()),
        rule,
        reason,
    });
}
