//! The decision set a reload replaces: the egress policy, the DNS block
//! list and its answer, and the rebind filter. One [`Live`] cell per
//! daemon holds the current set; every guest's forwarder and egress
//! boundary read it per decision, so a reload takes effect for all of them
//! at once, and a decision never sees half of an old set and half of a new.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::rebind::Rebind;
use crate::config::{BlockedAnswer, Config, Dns};
use crate::names::NameSet;
use crate::policy::{HostSet, Policy};

/// One consistent set of egress decisions.
pub struct Rules {
    /// The egress policy.
    pub policy: Arc<Policy>,
    /// Names answered as blocked.
    pub block: NameSet,
    /// How they are answered.
    pub blocked_answer: BlockedAnswer,
    /// The rebind filter, when protection is on.
    pub rebind: Option<Rebind>,
}

/// The current rules, swapped whole by a reload.
pub type Live = Arc<ArcSwap<Rules>>;

impl Rules {
    /// The `[dns]` side of `config` around `policy`; `own` are the
    /// sandbox's networks, internal for rebind protection.
    pub fn new(config: &Dns, own: Vec<(IpAddr, u8)>, policy: Arc<Policy>) -> Self {
        Self {
            block: NameSet::new(config.block.iter().map(String::as_str)),
            blocked_answer: config.blocked_answer,
            rebind: config.rebind_protection.then(|| {
                let allow = config.rebind_allow.iter().map(String::as_str);
                Rebind::new(allow, own, policy.host_set().clone())
            }),
            policy,
        }
    }

    /// The rules of `config`; with `host`, its policy shares that host
    /// set (the one the daemon keeps up to date) instead of a new one.
    pub fn from_config(config: &Config, host: Option<&Arc<HostSet>>) -> Self {
        let mut policy = config.policy();
        if let Some(host) = host {
            policy = policy.with_host_set(host.clone());
        }
        Self::new(&config.dns, config.own_networks(), Arc::new(policy))
    }

    /// A cell holding these rules.
    pub fn live(self) -> Live {
        Arc::new(ArcSwap::from_pointee(self))
    }
}
