//! The egress boundary's async side and its audit: the parts of a decision
//! that need I/O or shared state — the guest's name pins, our own
//! resolution of a claimed name, and the audit line with its counter —
//! around the pure [`Policy::judge`](crate::policy::Policy::judge). Every path that decides a flow comes
//! here or to `judge` directly: the engine at a SYN, datagram or echo and
//! in its first-bytes gate (synchronously, with [`Egress::pinned`]), the
//! first-bytes service and TLS interception ([`Egress::decide`]).
//!
//! One per VMM connection (the pins are the guest's); the policy is the
//! daemon's. `decide` runs on tokio tasks; the rest on any thread.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit::{self, Reason};
use crate::dns::forward::Forwarder;
use crate::dns::pins::Pins;
use crate::dns::rules::{Live, Rules};
use crate::metrics::{Counter, Metrics};
use crate::names::NameSource;
use crate::policy::{Claim, Denied, Proto, Query, Verdict};

/// The egress side of one guest.
pub struct Egress {
    rules: Live,
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
    /// What its bytes were allowed for, for a reload to judge again.
    pub claimed: Claimed,
}

/// Most claims a flow keeps (a keep-alive HTTP flow names a Host per
/// request: the newest are kept; later requests are judged live anyway).
const MAX_CLAIMS: usize = 8;

/// What a TCP flow's bytes claimed and were allowed for — a TLS SNI, HTTP
/// Hosts, or bytes that named nothing — shared between whoever decides them
/// (the engine's gate, a service's task) and the engine's flow, so that a
/// reload judges the flow again on what its bytes said, not only on its
/// address.
#[derive(Clone, Default)]
pub struct Claimed(Arc<Mutex<VecDeque<ClaimRecord>>>);

/// One recorded claim: the name and where it came from, or None for bytes
/// that named nothing.
pub type ClaimRecord = Option<(String, NameSource)>;

impl Claimed {
    /// Records an allowed claim (an unread one says nothing).
    pub fn record(&self, claim: Claim<'_>) {
        let entry = match claim {
            Claim::Unread => return,
            Claim::Unnamed => None,
            Claim::Named(name, source) => Some((name.to_owned(), source)),
        };
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if claims.contains(&entry) {
            return;
        }
        if claims.len() >= MAX_CLAIMS {
            claims.pop_front();
        }
        claims.push_back(entry);
    }

    /// The claims recorded, oldest first.
    pub fn claims(&self) -> Vec<ClaimRecord> {
        let claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        claims.iter().cloned().collect()
    }
}

impl Egress {
    /// The boundary over the daemon's `rules` (their policy, read per
    /// decision: a reload reaches every guest), with the guest's `pins` and
    /// the `forwarder` that answers the guest's DNS (which pins them).
    pub fn new(
        rules: Live,
        pins: Arc<Pins>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            rules,
            pins,
            forwarder,
            metrics,
        }
    }

    /// The rules in force now (`.policy` is the policy). A guard, not a
    /// clone: taken per policed frame, it costs no reference count.
    pub fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.rules.load()
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
        match self.rules().policy.judge(&query) {
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
        denied: Denied,
    ) {
        self.metrics.inc(Counter::policy_denied);
        self.count_rule(denied);
        audit(proto, (dst, port), name, denied, false);
    }

    /// Counts and audits a live flow a reload's rules deny (the caller
    /// resets it).
    pub fn revoke(
        &self,
        proto: Proto,
        (dst, port): (IpAddr, Option<u16>),
        name: Option<(&str, NameSource)>,
        denied: Denied,
    ) {
        self.metrics.inc(Counter::policy_revoked);
        self.count_rule(denied);
        audit(proto, (dst, port), name, denied, true);
    }

    /// Counts a deny against the rule that decided it (one that no rule
    /// decided — a name that does not belong to its address — is not a
    /// rule's).
    pub fn count_rule(&self, (rule, reason): Denied) {
        if reason == Reason::Policy {
            self.metrics.rule_denied(rule);
        }
    }

    /// Counts an allowed flow.
    pub fn allowed(&self) {
        self.metrics.inc(Counter::policy_allowed);
    }
}

/// The audit line of a deny.
fn audit(
    proto: Proto,
    (dst, port): (IpAddr, Option<u16>),
    name: Option<(&str, NameSource)>,
    (rule, reason): Denied,
    reload: bool,
) {
    audit::deny(&audit::Deny {
        proto: proto.as_str(),
        dst: Some(dst),
        port: port.unwrap_or(0),
        name: name.map(|(n, _)| n),
        name_source: name.map(|(_, s)| s.as_str()),
        rule,
        reason,
        reload,
    });
}

impl Target {
    /// Decides the flow from its first bytes' claim; a deny is counted and
    /// audited.
    pub async fn decide(&self, claim: Claim<'_>) -> Result<(), Denied> {
        let result = self.egress.decide(self.dst, claim).await;
        if result.is_ok() {
            self.claimed.record(claim);
        }
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

/// Follows a flow's guest bytes for a task (the first-bytes service, the
/// inside of TLS interception): every name they carry — the first bytes',
/// then each HTTP request head's — is decided through the [`Target`]
/// before the bytes go on; bytes of an incomplete head are held back.
pub struct Inspector {
    target: Target,
    held: crate::sniff::Held,
    /// The flow was named already (its TLS SNI): what names nothing inside
    /// keeps that decision.
    named: bool,
}

/// A flow the inspector refused: why, and the name it refused (for a 403
/// that says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule and reason.
    pub denied: Denied,
    /// The name refused, when there was one.
    pub name: Option<String>,
}

impl Inspector {
    /// An inspector for a flow whose bytes start now.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            held: crate::sniff::Held::new(),
            named: false,
        }
    }

    /// An inspector for the inside of a flow its TLS SNI already named and
    /// the policy allowed: each request's host is decided, and what names
    /// nothing keeps the SNI's decision.
    pub fn inside_named(target: Target) -> Self {
        Self {
            named: true,
            ..Self::new(target)
        }
    }

    /// Whether the first bytes are still awaited.
    pub fn is_starting(&self) -> bool {
        self.held.is_starting()
    }

    /// Bytes held back so far.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes the guest's next bytes (`fin`: its FIN follows them); returns
    /// what may go to the server now (possibly nothing yet), or the refusal
    /// (counted and audited).
    pub async fn pass(&mut self, data: &[u8], fin: bool) -> Result<Vec<u8>, Refusal> {
        use crate::sniff::Step;
        match self.held.push(data, fin) {
            Step::Wait => return Ok(Vec::new()),
            Step::Unreadable(_) => {
                let denied = (None, Reason::NameUnreadable);
                let (ip, port) = (self.target.dst.ip(), Some(self.target.dst.port()));
                self.target.egress.deny(Proto::Tcp, ip, port, None, denied);
                return Err(Refusal { denied, name: None });
            }
            Step::Names(names) => {
                for (name, source) in names {
                    let claim = match &name {
                        Some(n) => Claim::Named(n, source),
                        None if self.named => continue,
                        None => Claim::Unnamed,
                    };
                    if let Err(denied) = self.target.decide(claim).await {
                        return Err(Refusal { denied, name });
                    }
                    self.target.egress.allowed();
                }
            }
        }
        Ok(self.held.release())
    }

    /// Gives up waiting for the first bytes (a timeout with nothing sent):
    /// the flow is decided as unnamed for now; what the guest sends later is
    /// still read from its start.
    pub async fn decide_unnamed(&self) -> Result<(), Denied> {
        let result = self.target.decide(Claim::Unnamed).await;
        if result.is_ok() {
            self.target.egress.allowed();
        }
        result
    }

    /// The flow's target.
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl crate::proxy::tcp::Inspect for Inspector {
    fn pass<'a>(
        &'a mut self,
        data: &'a [u8],
        fin: bool,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + 'a>> {
        Box::pin(async move { Inspector::pass(self, data, fin).await.ok() })
    }
}

/// Relays a flow between the guest and the server both ways, the guest's
/// bytes through `inspector` first; ends when both directions have; a
/// refusal stops both at once and is returned (the caller answers it).
pub async fn relay_inspected<G, S>(
    guest: &mut G,
    server: &mut S,
    inspector: &mut Inspector,
) -> Result<(), Refusal>
where
    G: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_guest, mut to_guest) = tokio::io::split(guest);
    let (mut from_server, mut to_server) = tokio::io::split(server);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // A read error ends the guest's side like an EOF would.
            let n = from_guest.read(&mut buf).await.unwrap_or(0);
            let fin = n == 0;
            let cleared = inspector
                .pass(buf.get(..n).unwrap_or_default(), fin)
                .await?;
            if to_server.write_all(&cleared).await.is_err() {
                return Ok(());
            }
            if fin {
                // The server may already be gone; nothing to tell it then.
                let _ = to_server.shutdown().await;
                return Ok(());
            }
        }
    };
    let down = async {
        // Errors end the copy; the other direction ends on its own.
        let _ = tokio::io::copy(&mut from_server, &mut to_guest).await;
        let _ = to_guest.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        result = &mut up => {
            result?;
            down.await;
            Ok(())
        }
        () = &mut down => up.await,
    }
}
