//! Live reload (SIGHUP, `POST /v1/reload`): the config file is read and
//! checked in full; what cannot change under a running guest is refused
//! with the sections named; then the published ports are brought to the
//! new `[[publish]]` set, the rules (policy, block lists, rebind filter) are
//! swapped in one step for every guest, and the attached guest's live flows
//! that the new rules deny — and the old ones allowed — are reset and
//! audited with reason `reload`. A refused or failed reload changes nothing
//! and the running config stays.
//!
//! Reloads run one at a time, on the host runtime or the signal thread.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Publish, Source};
use crate::dns::rules::Rules;
use crate::engine::Shared;
use crate::metrics::Counter;
use crate::proxy::publish::{Error as PublishError, Publisher};

/// How long a reload waits for the guest's queue pairs to judge their
/// flows (a pair that does not run never answers).
const RECONSIDER_WAIT: Duration = Duration::from_secs(2);

/// Re-reads and applies the config.
pub struct Reloader {
    shared: Arc<Shared>,
    /// Where the config is read from, as at start.
    source: Source,
    /// The config in force: the start config with reloads applied. Its
    /// lock makes reloads take turns.
    current: tokio::sync::Mutex<Config>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reloaded {
    /// The reloadable parts that changed: `policy`, `dns` (block lists,
    /// blocked answer, rebind filter), `publish`.
    pub changed: Vec<&'static str>,
    /// Entries published by it.
    pub published: Vec<Publish>,
    /// Entries unpublished by it.
    pub unpublished: Vec<Publish>,
    /// Live flows and sessions the new rules deny, reset.
    pub flows_reset: usize,
}

/// Why a reload was refused; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file does not read or does not check out.
    #[error("the new config is invalid")]
    Invalid(#[source] crate::config::Error),
    /// It changes what a running daemon cannot change.
    #[error(
        "the new config changes {} — settings a reload cannot apply under a running guest \
         (its addresses, MTU, queues, limits, TLS, confinement); restart the daemon for them",
        .0.join(", ")
    )]
    NeedsRestart(Vec<&'static str>),
    /// A privileged port to publish: the capability to bind it is gone.
    #[error(
        "publish {0}: ports below 1024 are bound only at start (CAP_NET_BIND_SERVICE is dropped \
         once started); restart the daemon for it"
    )]
    Privileged(SocketAddr),
    /// A new entry could not be published (nothing changed).
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl Reloader {
    /// A reloader reading `source` for the daemon sharing `shared`, whose
    /// config in force is `current`.
    pub fn new(shared: Arc<Shared>, source: Source, current: Config) -> Self {
        Self {
            shared,
            source,
            current: tokio::sync::Mutex::new(current),
        }
    }

    /// Reads, checks and applies the config file; counts and logs the
    /// outcome.
    pub async fn reload(&self) -> Result<Reloaded, Error> {
        let result = self.apply().await;
        let metrics = &self.shared.metrics;
        match &result {
            Ok(done) => {
                metrics.inc(Counter::reloads);
                tracing::info!(
                    changed = ?done.changed,
                    published = done.published.len(),
                    unpublished = done.unpublished.len(),
                    flows_reset = done.flows_reset,
                    "config reloaded"
                );
            }
            Err(e) => {
                metrics.inc(Counter::reloads_refused);
                tracing::warn!(
                    error = %crate::errors::chain(e),
                    "reload refused; the running config stays"
                );
            }
        }
        result
    }

    async fn apply(&self) -> Result<Reloaded, Error> {
        let mut current = self.current.lock().await;
        let new = self.source.read().map_err(Error::Invalid)?;
        let refused = needs_restart(&current, &new);
        if !refused.is_empty() {
            return Err(Error::NeedsRestart(refused));
        }
        let mut done = Reloaded {
            changed: reloadable_changes(&current, &new),
            ..Default::default()
        };
        if let Some(publisher) = &self.shared.publisher {
            let (published, unpublished) =
                republish(publisher, &current.publish, &new.publish).await?;
            done.published = published;
            done.unpublished = unpublished;
        }
        let old = self.shared.rules.load_full();
        let rules = Rules::from_config(&new, Some(old.policy.host_set()));
        let policy = rules.policy.clone();
        self.shared.rules.store(Arc::new(rules));
        if let Some((guest, _)) = self.shared.board.guest() {
            for answer in guest.reconsider(&old.policy, &policy) {
                // A pair that did not answer in time judges nothing: its
                // queues are not running, so it carries no flows.
                if let Ok(Ok(reset)) = tokio::time::timeout(RECONSIDER_WAIT, answer).await {
                    done.flows_reset += reset;
                }
            }
        }
        *current = new;
        Ok(done)
    }
}

/// The parts of `new` that differ from `old` and that a reload may not
/// change, by section (`dns` for its keys other than the block lists,
/// blocked answer and rebind filter).
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = new.clone();
    fixed.policy = old.policy.clone();
    fixed.publish = old.publish.clone();
    let (dns, was) = (&mut fixed.dns, &old.dns);
    dns.block = was.block.clone();
    dns.block_files = was.block_files.clone();
    dns.blocked_answer = was.blocked_answer;
    dns.rebind_protection = was.rebind_protection;
    dns.rebind_allow = was.rebind_allow.clone();
    let sections: [(&'static str, bool); 10] = [
        ("network", fixed.network != old.network),
        ("outbound", fixed.outbound != old.outbound),
        ("tcp", fixed.tcp != old.tcp),
        ("udp", fixed.udp != old.udp),
        ("icmp", fixed.icmp != old.icmp),
        ("fragments", fixed.fragments != old.fragments),
        ("dns", fixed.dns != old.dns),
        ("tls", fixed.tls != old.tls),
        ("confinement", fixed.confinement != old.confinement),
        ("pcap", fixed.pcap != old.pcap),
    ];
    let mut out: Vec<&'static str> = sections
        .iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| *name)
        .collect();
    // A section added to the config and missing above must not slip
    // through unapplied.
    if out.is_empty() && fixed != *old {
        out.push("the config");
    }
    out
}

/// The reloadable parts that differ.
fn reloadable_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let dns = |c: &Config| {
        let d = &c.dns;
        (
            d.block.clone(),
            d.blocked_answer,
            d.rebind_protection,
            d.rebind_allow.clone(),
        )
    };
    let mut out = Vec::new();
    if old.policy != new.policy {
        out.push("policy");
    }
    if dns(old) != dns(new) {
        out.push("dns");
    }
    if old.publish != new.publish {
        out.push("publish");
    }
    out
}

/// Brings the published ports from the `old` config's set to the `new`
/// one's (entries added at run time through the API are left alone):
/// new entries on free addresses are bound first, so a bind that fails
/// leaves everything as it was; then removed entries go (their sockets
/// closed); then entries that reuse a removed address are bound. Returns
/// (published, unpublished).
async fn republish(
    publisher: &Publisher,
    old: &[Publish],
    new: &[Publish],
) -> Result<(Vec<Publish>, Vec<Publish>), Error> {
    let running = publisher.list();
    let added: Vec<Publish> = new
        .iter()
        .filter(|e| !old.contains(e) && !running.contains(e))
        .cloned()
        .collect();
    let removed: Vec<Publish> = old.iter().filter(|e| !new.contains(e)).cloned().collect();
    if let Some(e) = added.iter().find(|e| e.host.port() < 1024) {
        return Err(Error::Privileged(e.host));
    }
    let same_place = |a: &Publish, b: &Publish| a.protocol == b.protocol && a.host == b.host;
    let (reused, fresh): (Vec<Publish>, Vec<Publish>) = added
        .into_iter()
        .partition(|a| removed.iter().any(|r| same_place(a, r)));
    let mut bound = Vec::new();
    for entry in &fresh {
        if let Err(e) = publisher.add(entry.clone()) {
            unpublish(publisher, &bound).await;
            return Err(e.into());
        }
        bound.push(entry.clone());
    }
    unpublish(publisher, &removed).await;
    for entry in &reused {
        if let Err(e) = publisher.add(entry.clone()) {
            // Back to the old set: the addresses were just freed, so the
            // old entries bind again.
            unpublish(publisher, &bound).await;
            for entry in &removed {
                if let Err(again) = publisher.add(entry.clone()) {
                    tracing::error!(
                        error = %crate::errors::chain(&again),
                        "a reload could not restore a published port it removed"
                    );
                }
            }
            return Err(e.into());
        }
        bound.push(entry.clone());
    }
    Ok((bound, removed))
}

/// Stops publishing `entries` and waits until their sockets are closed.
async fn unpublish(publisher: &Publisher, entries: &[Publish]) {
    for entry in entries {
        if let Some((_, task)) = publisher.remove(entry.protocol, entry.host) {
            // The task was aborted: its JoinError says only that.
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    #[test]
    fn policy_block_lists_and_publish_reload_the_rest_needs_a_restart() {
        let old = Config::embedded();
        let reloadable = config(
            "[policy]\npreset = \"none\"\n[dns]\nblock = [\"ads.test\"]\nblocked-answer = \"refused\"\n\
             rebind-allow = [\"lan.test\"]\n[[publish]]\nprotocol = \"tcp\"\nhost = \"127.0.0.1:8080\"\nguest-port = 80\n",
        );
        assert!(needs_restart(&old, &reloadable).is_empty());
        assert_eq!(
            reloadable_changes(&old, &reloadable),
            ["policy", "dns", "publish"]
        );
        assert!(reloadable_changes(&old, &old).is_empty());
        for (text, section) in [
            ("[network]\nmtu = 9000\n", "network"),
            (
                "[network]\nipv4-gateway = \"10.9.0.1\"\nipv4-guest = \"10.9.0.2\"\n",
                "network",
            ),
            ("[tcp]\nmax-connections = 10\n", "tcp"),
            ("[udp]\nmax-sessions = 10\n", "udp"),
            ("[dns]\ntimeout-ms = 900\n", "dns"),
            ("[outbound]\nallow-host-loopback = true\n", "outbound"),
        ] {
            let new = config(text);
            assert_eq!(needs_restart(&old, &new), [section], "{text}");
        }
        let both = config(
            "[network]\nmtu = 9000\n[tcp]\nmax-connections = 10\n[policy]\npreset = \"none\"\n",
        );
        assert_eq!(needs_restart(&old, &both), ["network", "tcp"]);
    }
}
