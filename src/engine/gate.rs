//! The name gate of a TCP flow to an address the guest was given by our
//! DNS, when the policy has a domain rule that another name could turn:
//! the flow is dialled and accepted as usual, but the guest's first bytes
//! stay in the engine until they name the flow (TLS SNI, HTTP host) or show
//! they will not. A name must be one of the names the address was given for
//! — no fronting an address with another name — and the policy decides on
//! it; without a name, any pin that allows the address speaks for it.
//! Bytes that hide or double the name are refused.
//!
//! An HTTP connection stays gated for its whole life: every later request
//! head (pipelined or keep-alive) is decided the same way before its bytes
//! go to the server ([`Gate::take`]).
//!
//! Runs on the engine thread, synchronously: the pins and the policy are
//! all it needs. The server may speak first: only the guest's direction
//! waits.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use smoltcp::socket::tcp;

use crate::audit::Reason;
use crate::egress::{Claimed, Egress};
use crate::policy::{Claim, Proto, Query, Verdict};
use crate::sniff::{FIRST_BYTES_LIMIT, Held, Step};

/// A flow whose guest bytes are checked before they go on.
pub struct Gate {
    /// Names the destination was given for at the SYN, newest first.
    names: Vec<String>,
    egress: Arc<Egress>,
    dst: SocketAddr,
    /// Bytes taken from the socket and not yet cleared.
    held: Held,
    /// Denied once: nothing passes any more.
    denied: bool,
    /// What the bytes were allowed for (the flow keeps it).
    claimed: Claimed,
}

/// What the gate says after taking the guest's latest bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to pass on now.
    Wait,
    /// These bytes are cleared: pass them on, in order.
    Pass(Vec<u8>),
    /// Denied (counted and audited): reset the flow.
    Denied,
}

impl Gate {
    /// A gate for a flow to `dst`, pinned to `names` (not empty), deciding
    /// through `egress`; what it allows goes into `claimed`.
    pub fn new(names: Vec<String>, egress: Arc<Egress>, dst: SocketAddr, claimed: Claimed) -> Self {
        Self {
            names,
            egress,
            dst,
            held: Held::new(),
            denied: false,
            claimed,
        }
    }

    /// Whether the gate has nothing left to do: later bytes cannot name
    /// anything and nothing is held (the flow may drop it).
    pub fn is_done(&self) -> bool {
        self.held.is_done()
    }

    /// Whether the guest's FIN may follow what was passed on: nothing is
    /// held back.
    pub fn may_finish(&self) -> bool {
        self.held.is_empty()
    }

    /// Takes up to `budget` new bytes from `socket` and returns what is
    /// cleared to go to the server.
    pub fn take(&mut self, socket: &mut tcp::Socket<'static>, budget: usize) -> Outcome {
        let limit = if self.held.is_starting() {
            FIRST_BYTES_LIMIT
        } else {
            self.held.len() + budget
        };
        let mut fresh = Vec::new();
        while socket.can_recv() && self.held.len() + fresh.len() < limit {
            let room = limit - self.held.len() - fresh.len();
            let taken = socket.recv(|buf| {
                let n = buf.len().min(room);
                fresh.extend_from_slice(buf.get(..n).unwrap_or_default());
                (n, n)
            });
            if !matches!(taken, Ok(n) if n > 0) {
                break;
            }
        }
        // Only the guest's FIN ends its bytes; a socket still in its
        // handshake has not started them.
        let finished = !socket.can_recv()
            && matches!(
                socket.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            );
        self.decide(&fresh, finished)
    }

    /// Decides `fresh` bytes (with what is held).
    fn decide(&mut self, fresh: &[u8], finished: bool) -> Outcome {
        if self.denied {
            return Outcome::Denied;
        }
        let step = self.held.push(fresh, finished);
        if !self.allows(step) {
            // What was held goes nowhere, now or at any later call.
            self.denied = true;
            self.held = Held::new();
            return Outcome::Denied;
        }
        let cleared = self.held.release();
        if cleared.is_empty() {
            Outcome::Wait
        } else {
            Outcome::Pass(cleared)
        }
    }

    /// Decides what a step of the stream calls for; audits a deny.
    fn allows(&mut self, step: Step) -> bool {
        let names = match step {
            Step::Wait => return true,
            Step::Names(names) => names,
            Step::Unreadable(_) => {
                let denied = (None, Reason::NameUnreadable);
                self.egress.deny(
                    Proto::Tcp,
                    self.dst.ip(),
                    Some(self.dst.port()),
                    None,
                    denied,
                );
                return false;
            }
        };
        let mut pinned = self.egress.pinned(self.dst.ip(), Instant::now());
        for name in &self.names {
            if !pinned.contains(name) {
                pinned.push(name.clone());
            }
        }
        for (name, source) in names {
            let claim = match &name {
                Some(n) => Claim::Named(n, source),
                None => Claim::Unnamed,
            };
            let query = Query {
                dst: self.dst.ip(),
                proto: Proto::Tcp,
                port: Some(self.dst.port()),
                pinned: &pinned,
                claim,
            };
            match self.egress.rules().policy.judge(&query) {
                // The names are pins, so nothing is left to resolve.
                Verdict::Allow(_) | Verdict::Resolve(_) | Verdict::NeedsName => {
                    self.egress.allowed();
                    self.claimed.record(claim);
                }
                Verdict::Deny(denied) => {
                    let (ip, port) = (self.dst.ip(), Some(self.dst.port()));
                    let named = name.as_deref().map(|n| (n, source));
                    self.egress.deny(Proto::Tcp, ip, port, named, denied);
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Destination, Policy, Rule};

    fn gate() -> Gate {
        // Allow *.ok.test, deny the rest; the address was given for
        // www.ok.test and evil.test (shared hosting).
        let rule = Rule {
            action: Action::Allow,
            destination: Destination::Name(crate::names::Pattern::Under("ok.test".into())),
            protos: Vec::new(),
            ports: Vec::new(),
        };
        let policy = Arc::new(Policy::new(vec![rule], Action::Deny, Vec::new()));
        let pins = Arc::new(crate::dns::pins::Pins::new(16));
        let dns = crate::config::Dns::default();
        let rules = crate::dns::rules::Rules::new(&dns, Vec::new(), policy).live();
        let forwarder =
            crate::dns::forward::Forwarder::new(&dns, Vec::new(), pins.clone(), rules.clone());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let egress = Egress::new(rules, pins, forwarder, metrics);
        Gate::new(
            vec!["www.ok.test".into(), "evil.test".into()],
            Arc::new(egress),
            "192.0.2.10:443".parse().unwrap(),
            Claimed::default(),
        )
    }

    fn run(gate: &mut Gate, bytes: &[u8], finished: bool) -> Outcome {
        gate.decide(bytes, finished)
    }

    #[test]
    fn a_socket_still_in_its_handshake_waits() {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64]),
            tcp::SocketBuffer::new(vec![0; 64]),
        );
        socket.listen(443).unwrap();
        let outcome = gate().take(&mut socket, 1024);
        assert_eq!(outcome, Outcome::Wait);
    }

    #[test]
    fn a_pinned_allowed_name_opens_with_its_bytes() {
        let hello = crate::sniff::tls::build_hello(Some("www.ok.test"), &[], 16_384);
        let mut g = gate();
        assert_eq!(run(&mut g, &hello[..30], false), Outcome::Wait);
        assert_eq!(run(&mut g, &hello[30..], false), Outcome::Pass(hello));
    }

    #[test]
    fn an_allowed_name_the_address_was_not_given_for_is_fronting() {
        let hello = crate::sniff::tls::build_hello(Some("api.ok.test"), &[], 16_384);
        assert_eq!(run(&mut gate(), &hello, false), Outcome::Denied);
    }

    #[test]
    fn a_pinned_name_the_policy_denies_is_denied() {
        let req = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(run(&mut gate(), req, false), Outcome::Denied);
    }

    #[test]
    fn no_name_keeps_the_pins_decision() {
        let ssh = b"SSH-2.0-probe\r\n".to_vec();
        assert_eq!(run(&mut gate(), &ssh, false), Outcome::Pass(ssh));
        let ip = b"GET / HTTP/1.1\r\nHost: 192.0.2.10\r\n\r\n".to_vec();
        assert_eq!(run(&mut gate(), &ip, false), Outcome::Pass(ip));
        // A half hello then FIN: no server reads a name from it; refused.
        let hello = crate::sniff::tls::build_hello(Some("www.ok.test"), &[], 16_384);
        assert_eq!(run(&mut gate(), &hello[..10], true), Outcome::Denied);
    }

    #[test]
    fn a_hello_split_into_records_is_read_whole() {
        let hello = crate::sniff::tls::build_hello(Some("evil.test"), &[], 7);
        assert_eq!(run(&mut gate(), &hello, false), Outcome::Denied);
        let hello = crate::sniff::tls::build_hello(Some("www.ok.test"), &[], 7);
        assert_eq!(run(&mut gate(), &hello, false), Outcome::Pass(hello));
    }

    #[test]
    fn every_request_of_a_kept_alive_connection_is_decided() {
        let mut g = gate();
        let first = b"GET / HTTP/1.1\r\nHost: www.ok.test\r\n\r\n".to_vec();
        assert_eq!(run(&mut g, &first, false), Outcome::Pass(first));
        // The next request in pieces: nothing of its head passes before it
        // is complete and decided.
        let next = b"\r\nget /b HTTP/1.1\nHost: www.ok.test\n\n";
        assert_eq!(run(&mut g, &next[..10], false), Outcome::Wait);
        assert_eq!(
            run(&mut g, &next[10..], false),
            Outcome::Pass(next.to_vec())
        );
        let evil = b"GET /c HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(run(&mut g, evil, false), Outcome::Denied);
        // Denied stays denied: nothing held is released later.
        assert_eq!(run(&mut g, b"", false), Outcome::Denied);
        assert_eq!(run(&mut g, b"", true), Outcome::Denied);
        // A head left incomplete at the FIN is refused, never passed.
        let mut g = gate();
        let first = b"GET / HTTP/1.1\r\nHost: www.ok.test\r\n\r\n".to_vec();
        assert_eq!(run(&mut g, &first, false), Outcome::Pass(first));
        assert_eq!(
            run(&mut g, b"GET / HTTP/1.1\r\nHost: evil.test\r\n", false),
            Outcome::Wait
        );
        assert_eq!(run(&mut g, b"", true), Outcome::Denied);
        // Something that hides the host is refused too.
        let mut g = gate();
        let first = b"GET / HTTP/1.1\r\nHost: www.ok.test\r\n\r\n".to_vec();
        assert_eq!(run(&mut g, &first, false), Outcome::Pass(first));
        let two = b"GET / HTTP/1.1\r\nHost: www.ok.test\r\nHost: evil.test\r\n\r\n";
        assert_eq!(run(&mut g, two, false), Outcome::Denied);
        // A pipelined pair in one piece: the allowed head passes only with
        // the decision on the second.
        let mut g = gate();
        let pair =
            b"GET / HTTP/1.1\r\nHost: www.ok.test\r\n\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(run(&mut g, pair, false), Outcome::Denied);
    }
}
